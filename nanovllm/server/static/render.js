// Model text as DOM nodes, without ever parsing it as HTML: every string goes in through
// textContent; code fences and `inline code` become <pre><code> and <code> elements built here.
"use strict";

function node(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Prose with `inline code` spans; line breaks are kept by CSS (white-space: pre-wrap). */
function prose(text) {
  const out = [];
  const parts = text.split(/`([^`\n]+)`/); // odd indices are the code spans' contents
  parts.forEach((part, i) => {
    if (part) out.push(node(i % 2 ? "code" : "span", i % 2 ? "inline" : "text", part));
  });
  return out;
}

/**
 * Replace el's children with text split at ``` fences: prose outside, <pre><code> inside. An
 * unclosed fence (a reply still streaming) runs to the end. The info string after the opening
 * fence (```python) is shown as a label, also as text.
 */
function renderText(el, text) {
  const nodes = [];
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      // A code block is a block of its own: the line breaks around its fences would be blank lines.
      if (i > 0) part = part.replace(/^\n+/, "");
      if (i < parts.length - 1) part = part.replace(/\n+$/, "");
      nodes.push(...prose(part));
      return;
    }
    const newline = part.indexOf("\n");
    let lang = "";
    let code = part;
    if (newline >= 0 && /^[\w+#.-]*$/.test(part.slice(0, newline).trim())) {
      lang = part.slice(0, newline).trim();
      code = part.slice(newline + 1);
    }
    const pre = node("pre", "code");
    if (lang) pre.append(node("span", "lang", lang));
    pre.append(node("code", "", code.replace(/\n$/, "")));
    nodes.push(pre);
  });
  el.replaceChildren(...nodes);
}
