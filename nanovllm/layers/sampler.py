import torch
from torch import nn


class Sampler(nn.Module):
    """Greedy rows (temperature 0) take the argmax; the others sample with the exponential race:
    argmax(p / E), E ~ Exp(1), which draws from p without a cumulative sum."""

    def forward(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        temps = torch.tensor([s.sampling_params.temperature for s in seqs], dtype=torch.float32)
        temps = temps.to(logits.device, non_blocking=True)
        greedy = logits.argmax(dim=-1)
        probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), dim=-1)
        sampled = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
        return torch.where(temps == 0, greedy, sampled)
