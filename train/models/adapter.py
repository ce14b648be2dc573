"""The Calligrapher style adapter: SigLIP embedding -> 128 style tokens -> every attention block.

Two pieces, both trainable, both owned by :class:`StyleAdapter`:

* ``image_proj`` (:class:`StyleProjection`): the sum of an MLP projection and a Q-Former
  projection of the pooled SigLIP embedding ``[B, E]`` into ``[B, N, D]`` style tokens
  (D = the transformer's ``joint_attention_dim``).
* ``ip_adapter``: one :class:`StyleAttention` per attention block of the FLUX transformer
  (double- and single-stream, in ``transformer.attn_processors`` order) with the extra key /
  value projections ``to_k_ip`` / ``to_v_ip``.

The transformer itself stays untouched apart from its attention processors, which are
replaced by thin callables that *reference* the adapter's modules. They are deliberately not
registered as sub-modules of the transformer, so the frozen base model and the trainable
adapter are two disjoint parameter trees: the adapter can be wrapped by DDP / FSDP on its own,
and a functional call with another set of adapter weights (old / reference policy) runs the
shared base model without copying it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb


class MLPProjection(nn.Module):
    """Linear(E, 2E) -> GELU -> Linear(2E, N*D) -> [N, D] -> LayerNorm(D). Keys match ``image_proj_mlp``."""

    def __init__(self, style_dim: int, token_dim: int, num_tokens: int):
        super().__init__()
        self.token_dim, self.num_tokens = token_dim, num_tokens
        self.proj = nn.Sequential(
            nn.Linear(style_dim, style_dim * 2), nn.GELU(), nn.Linear(style_dim * 2, token_dim * num_tokens)
        )
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(style).reshape(-1, self.num_tokens, self.token_dim))


class QFormerProjection(nn.Module):
    """Learned queries attending to 32 tokens made from the embedding. Keys match ``image_proj_qformer``."""

    def __init__(self, style_dim: int, token_dim: int, num_tokens: int, num_heads: int = 8,
                 num_kv_tokens: int = 32):
        super().__init__()
        self.token_dim = token_dim
        self.query_embeds = nn.Parameter(torch.randn(num_tokens, token_dim))
        self.id_proj = nn.Sequential(
            nn.Linear(style_dim, style_dim * 2), nn.GELU(), nn.Linear(style_dim * 2, token_dim * num_kv_tokens)
        )
        self.cross_attn = nn.MultiheadAttention(embed_dim=token_dim, num_heads=num_heads, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        kv = self.id_proj(style).view(style.shape[0], -1, self.token_dim)
        queries = self.query_embeds.unsqueeze(0).expand(style.shape[0], -1, -1)
        out = self._cross_attention(queries, kv)
        return self.norm(self.cross_attn_norm(out + queries))

    def _cross_attention(self, queries: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``nn.MultiheadAttention``'s math on its own parameters, written out with plain ops.

        Its fused kernels give slightly different results under ``torch.func.functional_call``;
        spelled out, the live adapter and a functional call with the same weights agree bit for bit.
        """
        mha = self.cross_attn
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        heads = mha.num_heads
        q = F.linear(queries, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = F.linear(kv, w_k, b_k).unflatten(-1, (heads, -1)).transpose(1, 2)
        v = F.linear(kv, w_v, b_v).unflatten(-1, (heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return mha.out_proj(out)


class StyleProjection(nn.Module):
    """``mlp(style) + qformer(style)``: pooled embedding ``[B, E]`` -> style tokens ``[B, N, D]``."""

    def __init__(self, style_dim: int, token_dim: int, num_tokens: int = 128):
        super().__init__()
        self.mlp = MLPProjection(style_dim, token_dim, num_tokens)
        self.qformer = QFormerProjection(style_dim, token_dim, num_tokens)

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        return self.mlp(style) + self.qformer(style)


class StyleAttention(nn.Module):
    """Weights of the style branch of one attention block, and the block's whole attention.

    ``__call__`` reproduces diffusers' ``FluxAttnProcessor`` op for op (so ``scale=0`` gives
    the base model bit for bit) and adds ``scale * SDPA(q, norm(k_ip), v_ip)`` over the style
    tokens, with ``q`` the block's queries after its q-norm and before the rotary embedding.
    """

    def __init__(self, token_dim: int, inner_dim: int, head_dim: int, scale: float = 1.0):
        super().__init__()
        self.head_dim, self.scale = head_dim, scale
        self.to_k_ip = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(token_dim, inner_dim, bias=False)
        self.norm_k_ip = nn.RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)

    def style_attention(self, query: torch.Tensor, image_emb: torch.Tensor, backend=None) -> torch.Tensor:
        """query ``[B, S, H, Dh]``, image_emb ``[B, N, D]`` -> ``[B, S, H*Dh]``.

        Never context-parallel: every rank holds all style tokens, so attending with its own
        query shard is already exact.
        """
        image_emb = image_emb.to(self.to_k_ip.weight.dtype)
        key = self.norm_k_ip(self.to_k_ip(image_emb).unflatten(-1, (-1, self.head_dim)))
        value = self.to_v_ip(image_emb).unflatten(-1, (-1, self.head_dim))
        out = dispatch_attention_fn(query, key.to(query.dtype), value.to(query.dtype), backend=backend)
        return out.flatten(2, 3).to(query.dtype)

    def attend(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               image_rotary_emb=None, image_emb=None, backend=None, parallel_config=None):
        """The block's attention with style; ``backend`` / ``parallel_config`` as diffusers' processors
        pass them to ``dispatch_attention_fn`` (set by ``transformer.set_attention_backend``)."""
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        # Double blocks: image queries only. Single blocks: the whole text+image sequence.
        style = self.style_attention(query, image_emb, backend) if image_emb is not None else None

        if encoder_hidden_states is not None:
            enc_q = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend,
                                              parallel_config=parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text_len, hidden_states.shape[1] - text_len], dim=1
            )
            if style is not None:
                hidden_states = hidden_states + self.scale * style
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        if style is not None:
            hidden_states = hidden_states + self.scale * style
        return hidden_states


class InstalledStyleProcessor:
    """What sits in ``attn.processor``: a plain callable, so the transformer does not own the weights.

    The explicit signature matters: diffusers filters ``joint_attention_kwargs`` by it, which
    is how ``image_emb`` reaches both double and single blocks. ``_attention_backend`` and
    ``_parallel_config`` are the attributes ``set_attention_backend`` / context parallelism set on
    diffusers' own processors; they are passed on to every attention call.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, module: StyleAttention):
        self.module = module

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, image_emb=None):
        return self.module.attend(attn, hidden_states, encoder_hidden_states, attention_mask,
                                  image_rotary_emb, image_emb, backend=self._attention_backend,
                                  parallel_config=self._parallel_config)


class StyleAdapter(nn.Module):
    """All trainable weights: ``image_proj`` and ``ip_adapter`` (one :class:`StyleAttention` per block).

    ``forward`` runs the whole conditioned transformer so that a DDP/FSDP wrapper around the
    adapter sees every use of its parameters, and so that ``torch.func.functional_call`` with
    another set of adapter weights evaluates the old / reference policy on the shared base model.
    """

    def __init__(self, style_dim: int, token_dim: int, block_dims: list[tuple[int, int]], num_tokens: int = 128):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_proj = StyleProjection(style_dim, token_dim, num_tokens)
        self.ip_adapter = nn.ModuleList(
            StyleAttention(token_dim, inner_dim, head_dim) for inner_dim, head_dim in block_dims
        )

    @classmethod
    def for_transformer(cls, transformer, style_dim: int, num_tokens: int = 128) -> "StyleAdapter":
        cfg = transformer.config
        inner, head = cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim
        n_blocks = len(transformer.attn_processors)
        return cls(style_dim, cfg.joint_attention_dim, [(inner, head)] * n_blocks, num_tokens)

    def install(self, transformer) -> None:
        """Point every attention block of ``transformer`` at this adapter (call after ``from_pretrained``)."""
        names = list(transformer.attn_processors.keys())
        if len(names) != len(self.ip_adapter):
            raise ValueError(f"adapter has {len(self.ip_adapter)} style blocks, transformer has {len(names)}")
        transformer.set_attn_processor({n: InstalledStyleProcessor(m) for n, m in zip(names, self.ip_adapter)})

    def set_scale(self, scale: float) -> None:
        for block in self.ip_adapter:
            block.scale = float(scale)

    def forward(self, transformer, style_embeds: torch.Tensor, **transformer_kwargs) -> torch.Tensor:
        """Velocity of ``transformer`` conditioned on pooled style embeddings ``[B, E]``."""
        tokens = self.image_proj(style_embeds.to(self.image_proj.mlp.norm.weight.dtype))
        kwargs = dict(transformer_kwargs.pop("joint_attention_kwargs", None) or {}, image_emb=tokens)
        return transformer(joint_attention_kwargs=kwargs, return_dict=False, **transformer_kwargs)[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
