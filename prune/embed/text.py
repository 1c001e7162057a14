"""The caption side of a CLIP: open_clip's tokenizer and text tower, run on the length captions use.

open_clip's `encode_text` runs every caption at the full context (77 tokens); LAION captions use a
fraction of it. With causal attention a token never sees the ones after it, so running only up to
the longest caption's end-of-text token in the batch gives the same features, in a fraction of the
time; the batch is also run in groups of similar length (sorted, `GROUPS` of them), so one long
caption does not stretch every other. That holds for open_clip's CLIP with `argmax` pooling (the
end-of-text token has the highest id); any other text tower runs open_clip's own `encode_text`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

MAX_CAPTION_CHARS = 4096  # a caption longer than this is cut (the tokenizer keeps 77 tokens anyway)
GROUPS = 4  # a batch's captions run in this many groups of similar length (at least 8 captions each)


class CaptionEncoder:
    """Captions -> L2-normalized float32 [N, dim] with an open_clip model's text tower."""

    def __init__(self, model, model_name: str, device: str, precision: str):
        import open_clip

        self.model, self.device, self.precision = model, device, precision
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.trimmed = isinstance(model, open_clip.model.CLIP) and getattr(model, "text_pool_type", "argmax") == "argmax"

    def tokens(self, captions: list[str]):
        return self.tokenizer([c[:MAX_CAPTION_CHARS] for c in captions])

    def _forward(self, text):
        import torch
        from open_clip.model import text_global_pool

        m = self.model
        if not self.trimmed:
            return m.encode_text(text)
        n = int(text.argmax(dim=-1).max()) + 1  # through the longest caption's end-of-text token
        text = text[:, :n]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:n].to(cast)
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = text_global_pool(x, text, m.text_pool_type)
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection if m.text_projection is not None else x

    def encode(self, captions: list[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            text = self.tokens(captions).to(self.device)
            feats = torch.empty(0)
            for rows in self._groups(text):
                with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    part = self._forward(text[rows]).float()
                if not len(feats):
                    feats = torch.empty((len(text), part.shape[-1]), dtype=torch.float32, device=part.device)
                feats[rows] = part
            return F.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)

    def _groups(self, text) -> list:
        """Row indices in groups of similar caption length (one group where nothing is trimmed)."""
        import torch

        if not self.trimmed or len(text) < 16:
            return [torch.arange(len(text))]
        order = torch.argsort(text.argmax(dim=-1), stable=True)
        size = max(8, -(-len(text) // GROUPS))
        return [order[i : i + size] for i in range(0, len(text), size)]


def decode_caption(raw: Optional[bytes]) -> Optional[str]:
    """A .txt member's bytes -> its caption; None when absent, empty or not UTF-8."""
    if not raw:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text[:MAX_CAPTION_CHARS] or None
