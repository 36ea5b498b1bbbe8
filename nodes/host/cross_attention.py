"""Prompt-to-Prompt's attention control on UNets: attn2 (cross) and attn1 (self) replace patches on every
transformer site that give the target branch the source branch's attention maps, and a local blend of the two
latents after each step.

Batch layout: in every model call, each chunk of rows named in ``cond_or_uncond`` holds 2 * rows rows, the source
branch's ``rows`` then the target branch's (target row j pairs with source row j). Only the conditional chunks
(index 0) are edited, as in the official code; the others attend normally.
"""
import numbers

import torch

from ...guidance_ops import prompt_to_prompt as p2p
from .attention import chain_unet_replace
from .family import DIT_FAMILIES, FAMILY_NAMES, UNET_FAMILIES, UnsupportedModel, attention_layers, model_family
from .runs import SIDE_PASS, RunScope, new_key, step_of


def prompt_token_ids(clip, text):
    """The token ids of ``text`` as the text encoder sees them (start, end and padding; every 77-token chunk):
    CLIP-L's on SD1.5, CLIP-G's on SDXL (both put every token at the same position; they differ only in the
    padding id)."""
    tokens = clip.tokenize(text)
    return [_token_id(t) for chunk in tokens[_main_encoder(tokens)] for t in chunk]


def encode_text(clip, text):
    """CONDITIONING for ``text``, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def word_token_ids(clip, word):
    """The token ids of ``word`` alone, without start, end or padding tokens."""
    tokens = clip.tokenize(word)
    key = _main_encoder(tokens)
    tokenizer = getattr(clip.tokenizer, f"clip_{key}")
    ids = [_token_id(t) for t in tokens[key][0]]
    start = 1 if ids and tokenizer.start_token is not None and ids[0] == tokenizer.start_token else 0
    stop = ids.index(tokenizer.end_token, start) if tokenizer.end_token in ids[start:] else len(ids)
    if stop == start:
        raise ValueError(f"'{word}' encodes to no tokens; name a word of the prompt")
    return ids[start:stop]


def _main_encoder(tokens):
    for key in ("g", "l"):
        if key in tokens:
            return key
    raise UnsupportedModel(f"prompt-to-prompt reads the token ids of a CLIP text encoder (SD1.5, SDXL), but this "
                           f"one tokenizes for {', '.join(sorted(tokens))}; connect the CLIP of an SD1.5 or SDXL "
                           f"checkpoint")


def _token_id(token):
    """An embedding (textual inversion) comes as a tensor, not an id: -1, which equals no other token."""
    value = token[0]
    return int(value) if isinstance(value, numbers.Integral) else -1


def install_prompt_to_prompt(model, plan, rows):
    """Install the attention control of ``plan`` on ``model`` (a clone the caller owns) for a batch of ``rows``
    source and ``rows`` target rows; returns the ``PromptToPromptController``."""
    family = model_family(model)
    if family in DIT_FAMILIES:
        raise UnsupportedModel(f"prompt-to-prompt needs separate cross-attention layers (image tokens attending to "
                               f"the prompt's tokens), which joint-attention DiTs like {FAMILY_NAMES[family]} do "
                               f"not have; use an SD1.5 or SDXL model")
    if family not in UNET_FAMILIES:
        raise UnsupportedModel(f"prompt-to-prompt serves UNet models (SD1.5, SDXL), not "
                               f"{type(model.model.diffusion_model).__name__}; connect an SD1.5 or SDXL model")
    controller = PromptToPromptController(model, plan, rows)
    for kind, block in attention_layers(model):
        chain_unet_replace(model, "attn2", kind, block, None, controller.cross_link)
        chain_unet_replace(model, "attn1", kind, block, None, controller.self_link)
    return controller


class _RunState:
    def __init__(self):
        self.sigmas = None  # the run's sample_sigmas, as floats
        self.maps = {}  # tokens of a level -> [source sum, target sum, count] of head-averaged cross maps
        self.cross_steps, self.self_steps, self.blend_steps = set(), set(), set()
        self.cross_layers, self.self_layers = set(), set()
        self.mask_fraction = None


class PromptToPromptController:
    def __init__(self, model, plan, rows):
        self.plan, self.rows = plan, int(rows)
        self.scope = RunScope(model, new_key("prompt_to_prompt"), lambda *_: _RunState(), self._report)

    def report(self):
        """What the running (or else the last) run did: layers and steps edited, the blend mask's area."""
        state = self.scope.state
        return self._report(state) if state is not None else dict(self.scope.last_report or self._report(None))

    @staticmethod
    def _report(state):
        state = state or _RunState()
        return {"cross_layers": len(state.cross_layers), "self_layers": len(state.self_layers),
                "cross_steps": len(state.cross_steps), "self_steps": len(state.self_steps),
                "blend_steps": len(state.blend_steps),
                "blend_mask_fraction": -1.0 if state.mask_fraction is None else state.mask_fraction}

    def cross_link(self, previous):
        def attn2(q, k, v, extra_options, **kwargs):
            state, branches = self._branches(q, extra_options)
            if branches is None:
                return previous(q, k, v, extra_options, **kwargs)
            plan, (source, target) = self.plan, branches
            if k.shape[1] != plan.tokens:
                raise ValueError(f"the conditioning has {k.shape[1]} tokens but the prompt-to-prompt plan was "
                                 f"made for {plan.tokens}: encode the prompts whose token ids made the plan")
            step = self._step(state, extra_options)
            replace = p2p.in_window(plan.cross_replace, step, len(state.sigmas) - 1)
            whole = replace and plan.injects_whole_map
            if whole:  # the target runs on the source's queries and keys: its map is the source's
                out = previous(_copy_rows(q, source, target), _copy_rows(k, source, target), v, extra_options,
                               **kwargs)
            else:
                out = previous(q, k, v, extra_options, **kwargs)
            if replace and not whole or plan.blends:
                heads = extra_options["n_heads"]
                source_probs = _probabilities(q[source], k[source], heads)
                target_probs = source_probs if whole else _probabilities(q[target], k[target], heads)
                if replace and not whole:
                    target_probs = p2p.replace_cross(source_probs, target_probs, plan)
                    out = out.index_copy(0, target, _attend(target_probs, v[target]).to(out.dtype))
                if plan.blends:
                    self._record(state, source_probs, target_probs, extra_options)
            if replace:
                state.cross_steps.add(step)
                state.cross_layers.add(_layer(extra_options))
            return out
        return attn2

    def self_link(self, previous):
        def attn1(q, k, v, extra_options, **kwargs):
            state, branches = self._branches(q, extra_options)
            if branches is not None:
                step = self._step(state, extra_options)
                height, width = extra_options["original_shape"][-2:]
                if (p2p.in_window(self.plan.self_replace, step, len(state.sigmas) - 1)
                        and q.shape[1] <= self.plan.self_max_fraction * height * width):
                    source, target = branches
                    state.self_steps.add(step)
                    state.self_layers.add(_layer(extra_options))
                    return previous(_copy_rows(q, source, target), _copy_rows(k, source, target), v,
                                    extra_options, **kwargs)
            return previous(q, k, v, extra_options, **kwargs)
        return attn1

    def blend(self, x, step_index):
        """Local blend of a [2 * rows, C, H, W] latent after step ``step_index``: the target rows keep the source
        rows outside the mask of the blend words (from the cross-attention maps of the steps so far). Identity
        when the plan names no blend words."""
        if not self.plan.blends:
            return x
        state = self.scope.state
        if state is None:
            raise RuntimeError("the prompt-to-prompt blend runs inside the sampling run of the model it was "
                               "installed on")
        if x.shape[0] != 2 * self.rows:
            raise ValueError(f"the latent has {x.shape[0]} rows; prompt-to-prompt expects {2 * self.rows} "
                             f"(source rows then target rows)")
        if not state.maps:
            return x
        level = p2p.blend_level(list(state.maps), x.shape[-2], x.shape[-1])
        source_sum, target_sum, count = state.maps[level]
        mask = p2p.blend_mask(source_sum / count, target_sum / count, self.plan, x.shape[-2:]).to(x.device)
        state.blend_steps.add(step_index)
        state.mask_fraction = float(mask.mean())
        source = x[:self.rows]
        return torch.cat([source, p2p.blend(source, x[self.rows:], mask)])

    def _branches(self, q, extra_options):
        """(run state, (source rows, target rows) of the conditional chunks), or (state, None) when this call
        holds no conditional chunk or no run is under way."""
        state = self.scope.state
        chunks = extra_options.get("cond_or_uncond") or ()
        if state is None or 0 not in chunks or extra_options.get(SIDE_PASS):
            return state, None
        size = q.shape[0] // len(chunks)
        if size != 2 * self.rows or size * len(chunks) != q.shape[0]:
            raise ValueError(f"prompt-to-prompt expects each conditioning chunk of the batch to hold "
                             f"{2 * self.rows} rows (source rows then target rows), but a chunk holds "
                             f"{q.shape[0] / len(chunks):g}; sample a latent of {2 * self.rows} rows")
        starts = [i * size for i, c in enumerate(chunks) if c == 0]
        source = torch.tensor([s + r for s in starts for r in range(self.rows)], device=q.device)
        return state, (source, source + self.rows)

    @staticmethod
    def _step(state, extra_options):
        """The sampling step of this model call (``step_of`` the run's sample_sigmas)."""
        if state.sigmas is None:
            if "sample_sigmas" not in extra_options:
                raise RuntimeError("prompt-to-prompt needs the run's sigmas (transformer_options "
                                   "'sample_sigmas'), which this sampler does not provide")
            state.sigmas = [float(s) for s in extra_options["sample_sigmas"]]
        return step_of(state.sigmas, float(extra_options["sigmas"].flatten()[0]))

    def _record(self, state, source_probs, target_probs, extra_options):
        """Add the head-averaged cross maps of the source and target rows to the run's sums for this level."""
        height, width = extra_options["original_shape"][-2:]
        tokens = source_probs.shape[2]
        h, w = p2p.map_size(tokens, height, width)
        maps = [p.mean(1).reshape(self.rows, -1, h, w, p.shape[-1]).mean(1) for p in (source_probs, target_probs)]
        entry = state.maps.get(tokens)
        if entry is None:
            state.maps[tokens] = [maps[0], maps[1], 1]
        else:
            entry[0], entry[1], entry[2] = entry[0] + maps[0], entry[1] + maps[1], entry[2] + 1


def _layer(extra_options):
    block = extra_options.get("block") or ("?", -1)
    return block[0], block[1], extra_options.get("block_index", 0)


def _copy_rows(t, source, target):
    """``t`` with its target rows replaced by the source rows."""
    return t.index_copy(0, target, t.index_select(0, source))


def _probabilities(q, k, heads):
    """softmax(q k^T / sqrt(d)) per head, in float32: [rows, heads, queries, keys] (q, k: [rows, tokens, heads * d])."""
    q, k = (t.float().reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


def _attend(probs, v):
    """probs [rows, heads, queries, keys] @ v [rows, keys, heads * d] -> [rows, queries, heads * d]."""
    rows, heads = probs.shape[:2]
    v = v.float().reshape(rows, v.shape[1], heads, -1).transpose(1, 2)
    return (probs @ v).transpose(1, 2).reshape(rows, probs.shape[2], -1)
