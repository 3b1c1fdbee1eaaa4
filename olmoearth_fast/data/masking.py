"""Masking strategies, vectorised over the batch (docs/reference_semantics.md §7).

A strategy maps a batch of normalised data (modality -> `[B,H,W,T,C_all]` or `[B,T,C_all]`,
−99999 where missing) and a patch size p to one pixel-resolution uint8 mask per modality,
`[B,H,W,T,BS]` or `[B,T,BS]`, with MaskValue codes and BS = bandsets of the tokenization.

Internally every modality is handled at token resolution (the top-left pixel of each p×p patch,
which is what the model reads) with per-(sample, unit) counts, where a unit is one
(modality, bandset). Random permutations are argsorts of uniform keys, so each sample/unit gets
an independent uniformly random arrangement of the exact reference counts without Python loops
over samples or tokens. The final pixel mask reproduces the reference's pixel rules:

* units left from the base draw: pixel = token value, but MISSING at every missing pixel;
* units re-drawn by `_random_fill_unmasked` (random_with_decode roles, the cross_random
  fallback): pixel = token value at all p×p pixels, MISSING only where the top-left is missing.

Randomness comes only from the `torch.Generator` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from olmoearth_fast.modalities import (
    LOSS_FIELD_ORDER,
    MISSING_VALUE,
    MaskValue,
    TokenizationConfig,
    as_tokenization,
    check_modalities,
    get_modality,
)

ONLINE = int(MaskValue.ONLINE_ENCODER)
TARGET = int(MaskValue.TARGET_ENCODER_ONLY)
DECODER = int(MaskValue.DECODER)
MISSING = int(MaskValue.MISSING)


def missing_pixel_masks(data: Mapping[str, Tensor], tokenization: TokenizationConfig
                        ) -> dict[str, Tensor]:
    """Per-bandset pixel missingness: True where any band of the group equals −99999.

    Returns modality -> bool `[B,H,W,T,BS]` / `[B,T,BS]`. Both views of a batch share it.
    """
    out = {}
    for m, x in data.items():
        miss = x == MISSING_VALUE
        groups = tokenization.bandset_indices(m)
        cols = []
        for g in groups:
            if g == list(range(g[0], g[0] + len(g))):
                cols.append(miss[..., g[0]:g[0] + len(g)].any(-1))
            else:
                cols.append(miss[..., g].any(-1))
        out[m] = torch.stack(cols, dim=-1)
    return out


class _Mod:
    """Token-resolution state of one modality during masking."""

    def __init__(self, name: str, miss: Tensor, p: int):
        self.name = name
        self.spec = get_modality(name)
        self.miss = miss  # pixel level, [B,H,W,T,BS] or [B,T,BS]
        self.p = p
        B, BS = miss.shape[0], miss.shape[-1]
        if self.spec.is_spatial:
            H, W = miss.shape[1], miss.shape[2]
            if H % p or W % p:
                raise ValueError(f"{name}: crop {H}x{W} px is not a multiple of patch_size={p}")
            h, w = H // p, W // p
            self.tl_miss = miss[:, ::p, ::p]
            blocks = miss.view(B, h, p, w, p, *miss.shape[3:])
            self.any_valid = ~blocks.all(dim=4).all(dim=2)
        else:
            self.tl_miss = miss
            self.any_valid = ~miss
        self.tok_shape = self.tl_miss.shape
        self.B, self.BS = B, BS
        self.tok = torch.full(self.tok_shape, DECODER, dtype=torch.uint8, device=miss.device)
        self.refilled = torch.zeros(B, BS, dtype=torch.bool, device=miss.device)

    # flatten helpers: [B, ..., BS] <-> [B, BS, n]
    def per_unit(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1).reshape(self.B, self.BS, -1)

    def from_per_unit(self, x: Tensor) -> Tensor:
        inner = self.tok_shape[1:-1]
        return x.view(self.B, self.BS, *inner).movedim(1, -1)

    def unit_bcast(self, x: Tensor) -> Tensor:
        """[B, BS] -> broadcastable against the token grid."""
        return x.view(self.B, *([1] * (len(self.tok_shape) - 2)), self.BS)

    def pixel_mask(self) -> Tensor:
        tok = self.tok
        if self.spec.is_spatial:
            B, h, w = tok.shape[:3]
            rest = tok.shape[3:]
            p = self.p
            tok = tok[:, :, None, :, None].expand(B, h, p, w, p, *rest)
            tok = tok.reshape(B, h * p, w * p, *rest)  # a fresh copy (p > 1) we may write
        if self.spec.is_spatial and self.p == 1 or not self.spec.is_spatial:
            tok = tok.clone()
        if bool(self.refilled.all()):
            return tok
        keep_missing = self.miss
        if bool(self.refilled.any()):
            keep_missing = keep_missing & ~self.unit_bcast(self.refilled)
        return tok.masked_fill(keep_missing, MISSING)  # out of place: tok may still be an expanded view (h or w == 1)


def _fill_by_rank(valid: Tensor, n_enc: Tensor, n_dec: Tensor, gen: torch.Generator) -> Tensor:
    """Random arrangement per row: n_enc ONLINE, n_dec DECODER, rest TARGET; invalid MISSING.

    valid: bool [G, n]; n_enc, n_dec: long [G]. Returns uint8 [G, n].
    """
    G, n = valid.shape
    keys = torch.rand(G, n, generator=gen, device=valid.device)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))  # invalid sort last
    order = keys.argsort(dim=1)
    pos = torch.arange(n, device=valid.device).expand(G, n)
    m = valid.sum(1, keepdim=True)
    e = n_enc.view(G, 1)
    d = e + n_dec.view(G, 1)
    vals = torch.full((G, n), MISSING, dtype=torch.uint8, device=valid.device)
    vals = torch.where(pos < m, torch.full_like(vals, TARGET), vals)
    vals = torch.where(pos < d, torch.full_like(vals, DECODER), vals)
    vals = torch.where(pos < e, torch.full_like(vals, ONLINE), vals)
    return torch.empty_like(vals).scatter_(1, order, vals)


def _fill_counts(m: Tensor, er: Tensor | float, dr: Tensor | float) -> tuple[Tensor, Tensor]:
    """`_random_fill_unmasked` counts: M == 1 -> (1, 0); else floor(M·er), floor(M·dr).

    The reference multiplies a token-count tensor by a Python float, i.e. in float32.
    """
    mf = m.to(torch.float32)
    n_enc = torch.floor(mf * er).long()
    n_dec = torch.floor(mf * dr).long()
    one = m == 1
    return torch.where(one, torch.ones_like(n_enc), n_enc), torch.where(one, 0, n_dec)


def _rank(keys: Tensor) -> Tensor:
    """Rank of each entry along dim 1 (0 = smallest)."""
    return keys.argsort(dim=1).argsort(dim=1)


def _randint(lo: Tensor, hi: Tensor, gen: torch.Generator) -> Tensor:
    """Uniform integer in [lo, hi] inclusive, per row (hi >= lo assumed)."""
    u = torch.rand(lo.shape, generator=gen, device=lo.device)
    k = lo + torch.floor(u * (hi - lo + 1).to(u.dtype)).long()
    return torch.minimum(k, hi)  # guard u*(n) rounding up to n


@dataclass
class MaskingConfig:
    """Name and parameters of a strategy (the reference's `strategy_config`).

    Attributes:
        name: "modality_cross_random", "random_with_decode", "random_time_with_decode" or
            "random".
        only_decode_modalities: modalities that are never encoded.
        allow_encoding_decoding_same_bandset, min/max_encoded_bandsets,
            min/max_decoded_bandsets: modality_cross_random only (reference defaults).
        random_ratio: random_time_with_decode only, P(random mode) per sample.
    """

    name: str
    encode_ratio: float = 0.5
    decode_ratio: float = 0.5
    only_decode_modalities: tuple[str, ...] = ()
    allow_encoding_decoding_same_bandset: bool = False
    min_encoded_bandsets: int | None = 2
    max_encoded_bandsets: int | None = None
    min_decoded_bandsets: int | None = None
    max_decoded_bandsets: int | None = None
    random_ratio: float = 0.5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["only_decode_modalities"] = list(d["only_decode_modalities"])
        return d


class MaskingStrategy:
    """Base class: ratios, tokenization, only-decode list; `__call__` returns pixel masks."""

    name = "base"

    def __init__(self, encode_ratio: float = 0.5, decode_ratio: float = 0.5,
                 only_decode_modalities: Sequence[str] = (),
                 tokenization: TokenizationConfig | Mapping | str | None = None):
        for k, v in (("encode_ratio", encode_ratio), ("decode_ratio", decode_ratio)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v}")
        self.encode_ratio = float(encode_ratio)
        self.decode_ratio = float(decode_ratio)
        self.only_decode_modalities = check_modalities(list(only_decode_modalities),
                                                       "only_decode_modalities")
        self.tokenization = as_tokenization(tokenization)

    def __call__(self, data: Mapping[str, Tensor], patch_size: int, generator: torch.Generator,
                 missing: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Mask one view.

        Args:
            data: modality -> float `[B,H,W,T,C_all]` / `[B,T,C_all]`, −99999 where missing.
            patch_size: p; H and W must be multiples of it.
            generator: the only source of randomness.
            missing: `missing_pixel_masks(data, self.tokenization)`, to share between views.

        Returns:
            modality -> uint8 pixel mask `[B,H,W,T,BS]` / `[B,T,BS]`.
        """
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if not data:
            raise ValueError("data must hold at least one modality")
        if missing is None:
            missing = missing_pixel_masks(data, self.tokenization)
        names = [m for m in LOSS_FIELD_ORDER if m in data]
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"unknown modalities in data: {sorted(unknown)}")
        mods = [_Mod(m, missing[m], patch_size) for m in names]
        self._mask(mods, generator)
        return {md.name: md.pixel_mask() for md in mods}

    def _mask(self, mods: list[_Mod], gen: torch.Generator) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- shared pieces
    def _base_random(self, mods: list[_Mod], gen: torch.Generator) -> None:
        """`_create_random_mask`: floor(N·er) ONLINE, floor(N·dr) DECODER over all N tokens
        (bandsets and months together, missing ones counted), one permutation per sample
        (one for the whole batch for static non-spatial modalities)."""
        for md in mods:
            B = md.B
            N = md.tok[0].numel()
            n_enc = int(N * self.encode_ratio)
            n_dec = int(N * self.decode_ratio)
            pattern = torch.full((N,), TARGET, dtype=torch.uint8, device=md.tok.device)
            pattern[:n_enc] = ONLINE
            pattern[n_enc:n_enc + n_dec] = DECODER
            rows = B if (md.spec.is_spatial or md.spec.is_multitemporal) else 1
            order = torch.rand(rows, N, generator=gen, device=md.tok.device).argsort(dim=1)
            flat = torch.empty(rows, N, dtype=torch.uint8, device=md.tok.device)
            flat.scatter_(1, order, pattern.expand(rows, N).contiguous())
            md.tok = flat.expand(B, N).reshape(md.tok_shape).clone()

    @staticmethod
    def _refill_units(md: _Mod, er: Tensor, dr: Tensor, which: Tensor,
                      gen: torch.Generator) -> None:
        """`_random_fill_unmasked` on each (sample, bandset) where `which` [B,BS] is True."""
        valid = md.per_unit(~md.tl_miss).reshape(md.B * md.BS, -1)
        n_enc, n_dec = _fill_counts(valid.sum(1), er.reshape(-1), dr.reshape(-1))
        new = md.from_per_unit(_fill_by_rank(valid, n_enc, n_dec, gen))
        md.tok = torch.where(md.unit_bcast(which), new, md.tok)
        md.refilled = md.refilled | which


class RandomMasking(MaskingStrategy):
    """`random`: the per-modality random mask, then MISSING (no roles)."""

    name = "random"

    def _mask(self, mods, gen):
        self._base_random(mods, gen)


class ModalityCrossRandomMasking(MaskingStrategy):
    """`modality_cross_random` (docs/reference_semantics.md §7.2).

    Base random mask per modality; per sample, the present (modality, bandset) units in field
    order get encode/decode roles (1 unit: encode; 2: first encode, second decode; >=3: k of the
    encodable units encoded, k ~ U[lo, hi], and, if allow_same, j ~ U[min_dec, max_dec] of all
    present units decoded, else all non-encoded ones). A non-encoded unit loses its ONLINE
    tokens (to TARGET) but keeps its DECODER tokens whether drawn or not (reference quirk);
    an encoded, non-decoded unit loses its DECODER tokens. Samples left without any ONLINE or
    any DECODER pixel have every non-only-decode modality re-drawn 50/50 jointly.

    Deviation: with >=3 units, no encodable one and allow_same False the reference raises (a
    negative sample size); here nothing is encoded and the fallback applies.
    """

    name = "modality_cross_random"

    def __init__(self, encode_ratio=0.5, decode_ratio=0.5, only_decode_modalities=(),
                 tokenization=None, allow_encoding_decoding_same_bandset: bool = False,
                 min_encoded_bandsets: int | None = 2, max_encoded_bandsets: int | None = None,
                 min_decoded_bandsets: int | None = None,
                 max_decoded_bandsets: int | None = None):
        super().__init__(encode_ratio, decode_ratio, only_decode_modalities, tokenization)
        if min_encoded_bandsets is None and max_encoded_bandsets is not None:
            raise ValueError("max_encoded_bandsets needs min_encoded_bandsets to be set")
        if min_encoded_bandsets is not None and min_encoded_bandsets <= 1:
            raise ValueError(f"min_encoded_bandsets must be > 1, got {min_encoded_bandsets}")
        self.allow_same = bool(allow_encoding_decoding_same_bandset)
        self.min_enc, self.max_enc = min_encoded_bandsets, max_encoded_bandsets
        self.min_dec, self.max_dec = min_decoded_bandsets, max_decoded_bandsets

    def _mask(self, mods, gen):
        self._base_random(mods, gen)
        dev = mods[0].tok.device
        B = mods[0].B
        od = torch.tensor([md.name in self.only_decode_modalities
                           for md in mods for _ in range(md.BS)], device=dev)
        # present units, [B, U] in field order
        cols = []
        for md in mods:
            mod_present = md.any_valid.reshape(B, -1).any(1, keepdim=True)
            online = (md.tok == ONLINE) & md.any_valid
            has_online = md.per_unit(online).any(-1)
            if md.name in self.only_decode_modalities:
                has_online = torch.ones_like(has_online)
            cols.append(mod_present & has_online)
        present = torch.cat(cols, dim=1)
        enc, dec = self._select_roles(present, od, gen)
        # rules, per unit
        u = 0
        for md in mods:
            e = md.unit_bcast(enc[:, u:u + md.BS])
            d = md.unit_bcast(dec[:, u:u + md.BS])
            u += md.BS
            tok = md.tok
            tok = torch.where((tok == ONLINE) & ~e, TARGET, tok)
            md.tok = torch.where((tok == DECODER) & e & ~d, TARGET, tok).to(torch.uint8)
        # fallback: no ONLINE or no DECODER pixel anywhere in the sample
        has_enc = torch.zeros(B, dtype=torch.bool, device=dev)
        has_dec = torch.zeros(B, dtype=torch.bool, device=dev)
        for md in mods:
            has_enc |= ((md.tok == ONLINE) & md.any_valid).reshape(B, -1).any(1)
            has_dec |= ((md.tok == DECODER) & md.any_valid).reshape(B, -1).any(1)
        redo = ~has_enc | ~has_dec
        if bool(redo.any()):
            for md in mods:
                if md.name in self.only_decode_modalities:
                    continue
                valid = ~md.tl_miss.reshape(B, -1)
                n_enc, n_dec = _fill_counts(valid.sum(1), self.encode_ratio, self.decode_ratio)
                new = _fill_by_rank(valid, n_enc, n_dec, gen).view(md.tok_shape)
                w = redo.view(B, *([1] * (md.tok.dim() - 1)))
                md.tok = torch.where(w, new, md.tok)
                md.refilled = md.refilled | redo.view(B, 1)

    def _select_roles(self, present: Tensor, od: Tensor, gen) -> tuple[Tensor, Tensor]:
        B, U = present.shape
        n_p = present.sum(1)
        c = present.long().cumsum(1)
        enc_small = present & ((n_p == 1).view(B, 1) | ((n_p == 2).view(B, 1) & (c == 1)))
        dec_small = present & (n_p == 2).view(B, 1) & (c == 2)
        encodable = present & ~od.view(1, U)
        n_e = encodable.sum(1)
        hi = n_e if self.allow_same else n_e - 1
        if self.max_enc is not None:
            hi = torch.clamp(hi, max=self.max_enc)
        lo = n_e if self.min_enc is None else torch.clamp(n_e, max=self.min_enc)
        lo = torch.minimum(lo, hi)
        k = torch.clamp(_randint(lo, hi, gen), min=0)
        keys = torch.rand(B, U, generator=gen, device=present.device)
        rank = _rank(torch.where(encodable, keys, torch.full_like(keys, 2.0)))
        enc_big = encodable & (rank < k.view(B, 1))
        if self.allow_same:
            # `min_decoded or 1`: a 0 becomes 1, as in the reference
            # `min(min_decoded or 1, n_p)`, `min(max_decoded or n_p, n_p)`: 0 means unset
            dlo = torch.clamp(n_p, max=self.min_dec or 1)
            dhi = torch.clamp(n_p, max=self.max_dec) if self.max_dec else n_p
            j = _randint(torch.minimum(dlo, dhi), dhi, gen)
            keys = torch.rand(B, U, generator=gen, device=present.device)
            rank = _rank(torch.where(present, keys, torch.full_like(keys, 2.0)))
            dec_big = present & (rank < j.view(B, 1))
        else:
            dec_big = present & ~enc_big
        big = (n_p >= 3).view(B, 1)
        return torch.where(big, enc_big, enc_small), torch.where(big, dec_big, dec_small)


class RandomWithDecodeMasking(MaskingStrategy):
    """`random_with_decode` (docs/reference_semantics.md §7.3).

    Only-decode modalities: every valid pixel DECODER. Per sample, the other units with any
    valid pixel are shuffled; the first ceil(n·er) take the encode role (floor(M·er) ONLINE,
    rest TARGET), the others the decode role (floor(M·dr) DECODER, rest TARGET), M = valid
    tokens of the unit; M == 1 gives one ONLINE token whatever the role; a single unit gets
    both ratios. No fallback.
    """

    name = "random_with_decode"

    def _roles(self, mods, gen):
        """Per-unit (er, dr) for every non-only-decode modality, and the unit lists."""
        B = mods[0].B
        ed = [md for md in mods if md.name not in self.only_decode_modalities]
        if not ed:
            return ed, None, None, None
        has = torch.cat([md.per_unit(md.any_valid).any(-1) for md in ed], dim=1)  # [B, U]
        n = has.sum(1)
        keys = torch.rand(has.shape, generator=gen, device=has.device)
        rank = _rank(torch.where(has, keys, torch.full_like(keys, 2.0)))
        n_enc_units = torch.ceil(n.to(torch.float64) * self.encode_ratio).long()
        enc_role = has & (rank < n_enc_units.view(B, 1))
        single = (n == 1).view(B, 1)
        er = torch.where(enc_role | single, self.encode_ratio, 0.0)
        dr = torch.where(~enc_role | single, self.decode_ratio, 0.0)
        return ed, has, enc_role, (er, dr)

    def _mask(self, mods, gen):
        ed, has, enc_role, ratios = self._roles(mods, gen)
        if not ed:
            return
        er, dr = ratios
        u = 0
        for md in ed:
            sl = slice(u, u + md.BS)
            u += md.BS
            self._refill_units(md, er[:, sl], dr[:, sl], torch.ones_like(has[:, sl]), gen)


class RandomTimeWithDecodeMasking(RandomWithDecodeMasking):
    """`random_time_with_decode` (later reference versions; docs/reference_semantics.md §7.4).

    As random_with_decode, but a sample whose spacetime encode/decode units cover >= 2 months
    uses, with probability 1 − random_ratio, time mode: its present months are shuffled, the
    first ceil(n_t·er) are encode months and the rest decode months; an encode-role spacetime
    unit is ONLINE at every pixel of the encode months (TARGET elsewhere, missing pixels kept
    MISSING), a decode-role one DECODER at the decode months. Non-spacetime units and units
    without data in their months fall back to the random fill; a single unit is random-filled.
    """

    name = "random_time_with_decode"

    def __init__(self, encode_ratio=0.5, decode_ratio=0.5, only_decode_modalities=(),
                 tokenization=None, random_ratio: float = 0.5):
        super().__init__(encode_ratio, decode_ratio, only_decode_modalities, tokenization)
        if random_ratio > 1:
            raise ValueError(f"random_ratio must be <= 1, got {random_ratio}")
        self.random_ratio = float(random_ratio)

    def _mask(self, mods, gen):
        ed, has, enc_role, ratios = self._roles(mods, gen)
        if not ed:
            return
        er, dr = ratios
        B = mods[0].B
        dev = has.device
        st = [md for md in ed if md.spec.is_spacetime]
        # per-unit presence per month, [B, T, BS] per spacetime modality
        t_valid = {md.name: md.any_valid.any(dim=1).any(dim=1) for md in st}
        u_off, u = {}, 0
        for md in ed:
            u_off[md.name] = u
            u += md.BS
        if st:
            T = st[0].tok_shape[3]
            month = torch.zeros(B, T, dtype=torch.bool, device=dev)
            for md in st:
                o = u_off[md.name]
                month |= (t_valid[md.name] & has[:, o:o + md.BS].view(B, 1, md.BS)).any(-1)
            n_t = month.sum(1)
            draw = torch.rand(B, generator=gen, device=dev)
            time_mode = (n_t > 1) & (draw >= self.random_ratio)
            keys = torch.rand(B, T, generator=gen, device=dev)
            rank = _rank(torch.where(month, keys, torch.full_like(keys, 2.0)))
            n_enc_t = torch.ceil(n_t.to(torch.float64) * self.encode_ratio).long()
            enc_t = month & (rank < n_enc_t.view(B, 1))
            dec_t = month & ~enc_t
        single = has.sum(1) == 1
        for md in ed:
            o = u_off[md.name]
            sl = slice(o, o + md.BS)
            random_units = torch.ones(B, md.BS, dtype=torch.bool, device=dev)
            if md.spec.is_spacetime:
                role_t = torch.where(enc_role[:, sl].view(B, 1, md.BS), enc_t.view(B, -1, 1),
                                     dec_t.view(B, -1, 1))  # [B, T, BS]
                has_data = (t_valid[md.name] & role_t).any(1)
                timed = time_mode.view(B, 1) & ~single.view(B, 1) & has[:, sl] & has_data
                random_units = ~timed
                value = torch.where(enc_role[:, sl], ONLINE, DECODER).to(torch.uint8)
                tok_t = torch.where(role_t.view(B, 1, 1, *role_t.shape[1:]),
                                    value.view(B, 1, 1, 1, md.BS), torch.tensor(TARGET,
                                    dtype=torch.uint8, device=dev))
                tok_t = tok_t.expand(md.tok_shape)
                md.tok = torch.where(md.unit_bcast(timed), tok_t, md.tok)
            self._refill_units(md, er[:, sl], dr[:, sl], random_units, gen)


STRATEGIES: dict[str, type[MaskingStrategy]] = {
    cls.name: cls for cls in (RandomMasking, ModalityCrossRandomMasking,
                              RandomWithDecodeMasking, RandomTimeWithDecodeMasking)
}


def build_masking(config: MaskingConfig | Mapping | str,
                  tokenization: TokenizationConfig | Mapping | str | None = None,
                  only_decode_modalities: Sequence[str] | None = None,
                  **params) -> MaskingStrategy:
    """Build a strategy from a MaskingConfig, a reference-style dict or a name.

    Args:
        config: `MaskingConfig`, `{"type"|"name": ..., **params}` or a strategy name.
        tokenization: the experiment's tokenization (mask last dim = its bandset count).
        only_decode_modalities: overrides the config's list when given.
        **params: extra/overriding strategy parameters.

    Raises:
        ValueError: unknown strategy (lists the valid ones) or a parameter it does not take.
    """
    if isinstance(config, MaskingConfig):
        cfg = config.to_dict()
    elif isinstance(config, str):
        cfg = {"name": config}
    elif isinstance(config, Mapping):
        cfg = dict(config)
        if "type" in cfg:
            cfg["name"] = cfg.pop("type")
    else:
        raise ValueError(f"masking config must be a MaskingConfig, mapping or name, got "
                         f"{type(config).__name__}")
    cfg.update(params)
    if only_decode_modalities is not None:
        cfg["only_decode_modalities"] = list(only_decode_modalities)
    name = cfg.pop("name", None)
    if name not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {name!r}; valid: {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    accepted = {
        "random": {"encode_ratio", "decode_ratio", "only_decode_modalities"},
        "random_with_decode": {"encode_ratio", "decode_ratio", "only_decode_modalities"},
        "random_time_with_decode": {"encode_ratio", "decode_ratio", "only_decode_modalities",
                                    "random_ratio"},
        "modality_cross_random": {"encode_ratio", "decode_ratio", "only_decode_modalities",
                                  "allow_encoding_decoding_same_bandset",
                                  "min_encoded_bandsets", "max_encoded_bandsets",
                                  "min_decoded_bandsets", "max_decoded_bandsets"},
    }[name]
    defaults = MaskingConfig(name="x").to_dict()
    kwargs = {}
    for k, v in cfg.items():
        if k in accepted:
            kwargs[k] = v
        elif k in defaults and v == defaults[k]:
            continue  # a MaskingConfig default for another strategy
        else:
            raise ValueError(f"masking strategy {name!r} does not take parameter {k!r}; "
                             f"it takes {sorted(accepted)}")
    return cls(tokenization=tokenization, **kwargs)


__all__ = [
    "MaskingConfig", "MaskingStrategy", "RandomMasking", "ModalityCrossRandomMasking",
    "RandomWithDecodeMasking", "RandomTimeWithDecodeMasking", "STRATEGIES", "build_masking",
    "missing_pixel_masks",
]
