"""NVLM-X and NVLM-H: identity at init, masks (by perturbation and directly), KV-cached generation, gradients
and a few training steps, processor outputs for D/X/H, presets, and the one layer <-> group rule (building X/H from released parts:
tests/test_convert.py, `convert stitch`).

Streams are written by hand (ids below) or by the Processor with the tiny tokenizer; models are the tiny
presets (4-layer LLM, 2 gated blocks before layers 1 and 3) with random weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from nvlm_jax import models
from nvlm_jax.config import CrossAttentionConfig, NVLMConfig
from nvlm_jax.fusion.cross_attention_inputs import check_tile_layout, cross_attention_inputs, tile_layout
from nvlm_jax.fusion.gated_cross_attention import merge_layer_groups, split_layer_groups
from nvlm_jax.fusion.nvlm_h import NVLMH
from nvlm_jax.fusion.nvlm_x import NVLMX
from nvlm_jax.generation import generate
from nvlm_jax.language.decoder import CausalLM
from nvlm_jax.presets import get_preset

O0 = {"xla_backend_optimization_level": 0}  # tiny CPU programs: compile ~3x faster, same results
PH, START, END = 255, (250, 251), (252, 253)  # placeholder id, `<Image>` and `</Image>` of the hand streams
REGULAR_TAG = lambda k: [241, 242 + k, 249]  # a 3-token "<tile_k>"
GLOBAL_TAG = [241, 248, 248, 249]  # a 4-token "<tile_global_thumbnail>"
N = 16  # tokens per tile of the tiny presets
L, T = 96, 5  # stream length and tile slots of the hand-written batch
CLASSES = {"x": NVLMX, "h": NVLMH}


# The stream-structure functions, jitted (eagerly, each of their small ops would compile on its own).
layout_of = jax.jit(
  tile_layout,
  static_argnames=(
    "image_token_id",
    "max_tiles",
    "one_tile_per_placeholder",
    "image_start_token_ids",
    "max_tag_tokens",
  ),
)
cross_inputs = jax.jit(cross_attention_inputs, static_argnames=("max_tag_tokens",))


def config_for(variant: str, **changes) -> NVLMConfig:
  return get_preset(f"tiny_nvlm_{variant}", image_start_token_ids=START, **changes)


def llm_params_from_cross_attention(lm_params, cfg: NVLMConfig) -> dict:
  """A scanned X/H model's `language_model` params -> plain CausalLM params (cross_attn blocks dropped)."""
  layers = merge_layer_groups(lm_params["decoder"]["groups"], cfg.cross_attention, cfg.llm.num_layers)
  return {**{k: v for k, v in lm_params.items() if k != "decoder"}, "decoder": {"layers": layers}}


def llm_to_cross_attention_params(llm_params, cfg: NVLMConfig) -> dict:
  """The inverse: CausalLM params -> an X/H `language_model` without its cross_attn blocks."""
  groups = split_layer_groups(llm_params["decoder"]["layers"], cfg.cross_attention, cfg.llm.num_layers)
  return {**{k: v for k, v in llm_params.items() if k != "decoder"}, "decoder": {"groups": groups}}


def random_params(model, seed: int, gate: float, std: float = 0.05) -> dict:
  """Seeded N(0, std) weights, norm scales 1 + noise, every gate = `gate` (0: the untrained model)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name.endswith("_gate"):
      return jnp.full(leaf.shape, gate, leaf.dtype)
    if name.endswith("scale") or "/ls" in name:
      return jnp.asarray(1.0 + 0.1 * noise, leaf.dtype)
    return jnp.asarray(std * noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------------------------------
# Hand-written streams: row 0 = text, image A (2 tiles + thumbnail), text, image B (1x1), text;
# row 1 = two packed samples (segment 1: image A', segment 2: image B'). Tile slot 2 is padding.


def write_image(ids, pos, variant, tags_global):
  """Writes <Image> tags/placeholders </Image> at pos; returns (end, [(tag_start, anchor, run, cross)])."""
  ids[pos : pos + 2] = START
  pos += 2
  tiles = []
  for k, is_global in enumerate(tags_global):
    tag = GLOBAL_TAG if is_global else REGULAR_TAG(k)
    ids[pos : pos + len(tag)] = tag
    tag_start, pos = pos, pos + len(tag)
    run = N if (variant == "h" and is_global) else 1
    ids[pos : pos + run] = PH
    tiles.append((tag_start, pos, run, run == 1))
    pos += run
  ids[pos : pos + 2] = END
  return pos + 2, tiles


def hand_batch(variant: str, seed: int = 0):
  """ids [2, L], segments [2, L], pixels [2, T, 56, 56, 3], tile mask [2, T] and per valid slot its facts."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 240, (2, L)).astype(np.int32)
  seg = np.ones((2, L), np.int32)
  facts = {0: {}, 1: {}}  # row -> slot -> (tag_start, anchor, run, cross, segment_end)
  slots = [0, 1, 3, 4]  # valid slots in order
  end, a = write_image(ids[0], 8, variant, [False, False, True])
  end, b = write_image(ids[0], end + 6, variant, [True])
  for slot, t in zip(slots, a + b):
    facts[0][slot] = t + (L,)
  split = 44
  end, a = write_image(ids[1], 5, variant, [False, False, True])
  assert end < split
  end, b = write_image(ids[1], split + 4, variant, [True])
  seg[1, split:] = 2
  seg[1, -3:] = 0  # trailing padding
  for slot, t in zip(slots, a + b):
    facts[1][slot] = t + (split if t[1] < split else L - 3,)
  pixels = rng.standard_normal((2, T, 56, 56, 3)).astype(np.float32)
  mask = np.zeros((2, T), bool)
  mask[:, slots] = True
  return ids, seg, pixels, mask, facts


@pytest.fixture(scope="module", params=["x", "h"])
def tiny(request):
  """(variant, model, params with gates 0.7, jitted forward(params, ids, segments, pixels, tile_mask))."""
  variant = request.param
  model = CLASSES[variant](config_for(variant))
  params = random_params(model, seed=1, gate=0.7)
  forward = jax.jit(
    lambda p, ids, seg, px, tm: model.apply({"params": p}, ids, segment_ids=seg, pixel_values=px, tile_mask=tm),
    compiler_options=O0,
  )
  return variant, model, params, forward


def with_gates(params, value: float):
  return jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.full_like(x, value) if str(getattr(path[-1], "key", "")).endswith("_gate") else x, params
  )


def test_identity_at_init_text_and_images(tiny):
  """Gates 0: X/H logits equal the LLM's, on text alone and on the decoder stream X/H build around images."""
  variant, model, params, forward = tiny
  cfg = model.config
  init = with_gates(params, 0.0)
  llm = CausalLM(cfg.llm)
  llm_params = llm_params_from_cross_attention(init["language_model"], cfg)
  llm_forward = jax.jit(
    lambda p, x, seg: llm.apply({"params": p}, inputs_embeds=x, segment_ids=seg), compiler_options=O0
  )
  ids, seg, pixels, mask, _ = hand_batch(variant)
  embeds, cross = jax.jit(
    lambda p: model.apply(
      {"params": p},
      jnp.asarray(ids),
      jnp.asarray(pixels),
      jnp.asarray(mask),
      segment_ids=jnp.asarray(seg),
      method="prepare_inputs",
    ),
    compiler_options=O0,
  )(init)
  assert bool(jnp.any(cross["mask"]))  # the images are really there
  ours = forward(init, ids, seg, pixels, mask)
  theirs = llm_forward(llm_params, embeds, jnp.asarray(seg))
  real = seg > 0
  diff = float(np.max(np.abs(np.asarray(ours - theirs))[real]))
  print(f"NVLM-{variant.upper()} at init vs its LLM (images present): max abs logit diff {diff:.2e}")
  assert diff <= 1e-5
  # Text alone (no pixels): exactly the LLM on the token ids, even with trained (nonzero) gates.
  text = np.where(ids == PH, 7, ids)
  plain = jax.jit(lambda p, x, seg: model.apply({"params": p}, x, segment_ids=seg), compiler_options=O0)
  want = llm_forward(llm_params, llm.apply({"params": llm_params}, jnp.asarray(text), method="embed"), jnp.asarray(seg))
  for gate_params in (init, params):
    got = plain(gate_params, jnp.asarray(text), jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)


def test_perturbing_a_tile_changes_only_the_positions_allowed_to_see_it(tiny):
  """Gates nonzero. Tile k may change: its own tag's tokens and everything after them in its sample (through
  self-attention); for H's thumbnail, everything from its image tokens on. Everything else is EXACTLY equal:
  text before the image, earlier tags of the same image (a tag sees only its tile), earlier images, other
  packed samples, padding."""
  variant, model, params, forward = tiny
  ids, seg, pixels, mask, facts = hand_batch(variant)
  base = np.asarray(forward(params, ids, seg, pixels, mask))
  noise = np.random.default_rng(5).standard_normal(pixels.shape[2:]).astype(np.float32)
  for slot in (0, 1, 3, 4):
    perturbed = pixels.copy()
    perturbed[:, slot] += noise
    diff = np.max(np.abs(np.asarray(forward(params, ids, seg, perturbed, mask)) - base), axis=-1)
    for row in (0, 1):
      tag_start, anchor, run, cross, seg_end = facts[row][slot]
      first = tag_start if cross else anchor
      seg_start = int(np.argmax(seg[row] == seg[row, anchor]))
      allowed = np.zeros(L, bool)
      allowed[first:seg_end] = True
      frozen = ~allowed & (seg[row] > 0)  # padding rows are never read
      where = f"NVLM-{variant.upper()} row {row} slot {slot}"
      assert np.all(diff[row][frozen] == 0), f"{where}: positions {np.flatnonzero(frozen & (diff[row] != 0))}"
      assert diff[row][first] > 1e-6 and diff[row][seg_end - 1] > 1e-6, where
      assert seg_start < first  # the sample's text before the tile is part of the unchanged region


def test_layout_and_masks_directly():
  """Per token: which tiles it sees (tag -> only its tile; text -> tiles whose anchor precedes it), padded
  keys, segments, the zero-key rows, and what decode steps may see."""
  for variant in ("x", "h"):
    ids, seg, _, mask, facts = hand_batch(variant)
    layout = layout_of(
      jnp.asarray(ids),
      jnp.asarray(seg),
      image_token_id=PH,
      max_tiles=T,
      one_tile_per_placeholder=variant == "x",
      image_start_token_ids=START,
      max_tag_tokens=8,
    )
    np.testing.assert_array_equal(np.asarray(layout.num_groups), [4, 4])
    e, per = 8, 4  # small fake features: N = 4 image tokens per tile
    embeds = jnp.asarray(np.random.default_rng(0).standard_normal((2, L, 6)), jnp.float32)
    features = jnp.ones((2, T, per, 6))
    cross_groups = layout.run_length == 1
    out = cross_inputs(
      layout, embeds, features, jnp.asarray(mask), jnp.asarray(seg), cross_groups=cross_groups, max_tag_tokens=e
    )
    sees = np.asarray(out["mask"][:, 0]).reshape(2, L, T, e + per)
    for row in (0, 1):
      for slot, (tag_start, anchor, run, cross, seg_end) in facts[row].items():
        tag_len = anchor - tag_start
        keys = sees[row, :, slot]  # [L, E + N]
        if not cross:
          assert not keys.any()  # H's thumbnail is in the decoder, not in the key/value stream
          continue
        assert keys[:, tag_len:e].sum() == 0  # padded tag slots are never keys
        visible_rows = np.flatnonzero(keys.any(axis=1))
        tag_rows = np.arange(tag_start, anchor)
        later = np.arange(anchor, seg_end)
        later = later[np.asarray(layout.tag_of)[row, later] < 0]  # other tiles' tags see only their own
        np.testing.assert_array_equal(visible_rows, np.concatenate([tag_rows, later]))
        # the memory holds the tag's token embeddings, then the image tokens
        kv = np.asarray(out["memory"]).reshape(2, T, e + per, 6)[row, slot]
        np.testing.assert_allclose(kv[:tag_len], np.asarray(embeds)[row, tag_start:anchor])
        np.testing.assert_allclose(kv[e:], 1.0)
    assert not np.asarray(out["has_keys"])[0, :8].any()  # text before the first image sees nothing
    assert not np.asarray(out["mask"])[..., 2 * (e + per) : 3 * (e + per)].any()  # padded slot 2
    visible = np.asarray(out["visible"]).reshape(2, T, e + per)
    assert visible[0, [0, 1]].any() and not visible[1, [0, 1]].any()  # decode steps: the last sample's tiles only
    # Concrete inputs whose placeholders do not match the tiles are refused, naming the row.
    check_tile_layout(
      layout,
      jnp.asarray(mask),
      image_token_id=PH,
      max_tiles=T,
      tokens_per_tile=None if variant == "x" else N,
      check_truncation=True,
    )
    fewer = mask.copy()
    fewer[1, 4] = False
    with pytest.raises(ValueError, match=r"row 1: 4 tile placeholder groups \(id 255\) but 3 valid tiles"):
      check_tile_layout(layout, jnp.asarray(fewer), image_token_id=PH, max_tiles=T)


def test_kv_cache_matches_full_recompute(tiny):
  """Prefill with images, then decode teacher-forced one token at a time from the cache: logits equal the
  full forward's; and nvlm_jax.generate (greedy) equals recomputing the whole sequence each step."""
  variant, model, params, forward = tiny
  ids, _, pixels, mask, _ = hand_batch(variant, seed=3)
  ids, pixels, mask = ids[[0, 0]], pixels[[0, 0]], mask[[0, 0]]  # row 0 (one sample, two images) twice...
  ids[1, 75:] = np.random.default_rng(9).integers(3, 240, L - 75)  # ...with a different question
  seg = np.ones((2, L), np.int32)
  full = np.asarray(forward(params, ids, seg, pixels, mask))
  steps = 4
  prompt = L - steps

  prefill = jax.jit(
    lambda p, x, px, tm: model.apply({"params": p}, x, pixel_values=px, tile_mask=tm, cache=model.init_cache(2, L)),
    compiler_options=O0,
  )
  decode = jax.jit(lambda p, x, cache: model.apply({"params": p}, x, cache=cache), compiler_options=O0)
  logits, cache = prefill(params, ids[:, :prompt], pixels, mask)
  last = model.apply({"params": params}, ids[:, :prompt], pixel_values=pixels, tile_mask=mask, logits_to_keep=1)
  np.testing.assert_allclose(np.asarray(last), np.asarray(logits)[:, -1:], atol=1e-5, rtol=0)  # generate's prefill
  assert cache["cross"]["k"].shape == (2, 2, T * (8 + N), 2, 16)  # [blocks, B, keys, kv_heads, head_dim]
  got = [np.asarray(logits)]
  for i in range(prompt, L):
    logits, cache = decode(params, ids[:, i : i + 1], cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-4, rtol=0)
  # Greedy generation through the generic generate() vs recomputation (right-padded to L: same compile).
  new = 5
  prompt = L - new
  tokens = np.asarray(
    generate(model, params, ids[:, :prompt], pixel_values=pixels, tile_mask=mask, max_new_tokens=new, eos_token_id=-1)
  )
  seq = ids.copy()
  seq[:, prompt:] = 0
  seg = np.zeros((2, L), np.int32)
  for step in range(new):
    seg[:, : prompt + step] = 1
    logits = np.asarray(forward(params, seq, seg, pixels, mask))
    seq[:, prompt + step] = np.argmax(logits[:, prompt + step - 1], axis=-1)
  np.testing.assert_array_equal(tokens, seq[:, prompt:])
  assert (tokens[0] != tokens[1]).any()  # the rows really differ


def test_gradients_reach_the_gates_then_the_weights_and_training_lowers_the_loss():
  """X pretraining recipe at toy scale: only cross_attn + projector train. At init (gates 0) only the gates
  get gradient; once they move, so do the cross-attention weights; an image-dependent answer is learned."""
  model = NVLMX(config_for("x"))
  params = random_params(model, seed=2, gate=0.0)
  ids, seg, pixels, mask, facts = hand_batch("x", seed=4)
  targets = np.array([11, 12])  # the answer at the last position of each row depends on its last image
  pixels[1, 4] = -pixels[0, 4]
  from nvlm_jax.training.optimizer import trainable_labels

  labels = trainable_labels(params, ("projector", "language_model/*cross_attn*"))
  tx = optax.multi_transform({"trainable": optax.adam(3e-2), "frozen": optax.set_to_zero()}, labels)
  last = np.array([L - 1, L - 4])

  def loss_fn(p):
    logits = model.apply(
      {"params": p},
      jnp.asarray(ids),
      segment_ids=jnp.asarray(seg),
      pixel_values=jnp.asarray(pixels),
      tile_mask=jnp.asarray(mask),
    )
    picked = logits[jnp.arange(2), last]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(picked, jnp.asarray(targets)))

  @jax.jit
  def step(p, opt):  # noqa: E306
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, grads

  opt = tx.init(params)
  block = lambda g: g["language_model"]["decoder"]["groups"]["cross_attn"]
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))
  losses = []
  for i in range(8):
    params, opt, loss, grads = step(params, opt)
    losses.append(float(loss))
    if i == 0:
      assert norm(block(grads)["attn_gate"]) > 0 and norm(block(grads)["mlp_gate"]) > 0
      assert norm(block(grads)["q_proj"]) == 0 and norm(block(grads)["k_proj"]) == 0  # tanh(0) = 0 in front
  assert norm(block(grads)["q_proj"]) > 0 and norm(block(grads)["k_proj"]) > 0 and norm(block(grads)["v_proj"]) > 0
  assert norm(grads["projector"]) > 0
  print(f"NVLM-X toy training losses: {[round(x, 3) for x in losses]}")
  assert losses[-1] < 0.8 * losses[0]


# ----------------------------------------------------------------------------------------------------
# Processor: the same messages and images for D, X and H.


@pytest.fixture(scope="module")
def tokenizer():
  from nvlm_jax.processing.tokenizer import build_tiny_tokenizer

  return build_tiny_tokenizer(None, vocab_size=420)


def processor(tok, fusion: str):
  from nvlm_jax.processing.processor import Processor

  return Processor(tok, image_size=56, patch_size=7, downsample_ratio=0.5, max_tiles_per_image=4, fusion=fusion)


def test_processor_outputs_for_d_x_h(tokenizer):
  from nvlm_jax.processing.tokenizer import VISION_PAD

  rng = np.random.default_rng(0)
  images = [
    Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)),
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)),
  ]
  messages = [
    {"role": "user", "content": "<image>\nCompare it with <image>, please."},
    {"role": "assistant", "content": "They differ."},
  ]
  out = {f: processor(tokenizer, f)(messages, images) for f in "dxh"}
  proc = {f: processor(tokenizer, f) for f in "dxh"}
  for f in "xh":  # the image side is identical
    np.testing.assert_array_equal(out[f]["pixel_values"], out["d"]["pixel_values"])
    np.testing.assert_array_equal(out[f]["tile_mask"], out["d"]["tile_mask"])
    answer = lambda o: o["input_ids"][0][o["labels"][0] >= 0]
    np.testing.assert_array_equal(answer(out[f]), answer(out["d"]))
  text = {f: proc[f].decode(out[f]["input_ids"][0]) for f in "dxh"}
  g = "<tile_global_thumbnail>"
  img1 = {
    "d": f"<tile_1>{VISION_PAD * 16}<tile_2>{VISION_PAD * 16}{g}{VISION_PAD * 16}",
    "x": f"<tile_1>{VISION_PAD}<tile_2>{VISION_PAD}{g}{VISION_PAD}",
    "h": f"<tile_1>{VISION_PAD}<tile_2>{VISION_PAD}{g}{VISION_PAD * 16}",
  }
  img2 = {"d": g + VISION_PAD * 16, "x": g + VISION_PAD, "h": g + VISION_PAD * 16}  # a 1x1 image
  for f in "dxh":
    assert text[f] == (
      f"<|im_start|>user\n<Image>{img1[f]}</Image>\nCompare it with <Image>{img2[f]}</Image>, "
      "please.<|im_end|>\n<|im_start|>assistant\nThey differ.<|im_end|>\n"
    ), f
  # X/H: the model finds every tile and exactly its tag's tokens in the processor's ids.
  for f in "xh":
    ids = out[f]["input_ids"]
    cfg = proc[f].model_token_ids()
    assert cfg["image_start_token_ids"] == tuple(tokenizer.encode("<Image>"))
    layout = layout_of(
      jnp.asarray(ids),
      None,
      image_token_id=cfg["image_token_id"],
      max_tiles=4,
      one_tile_per_placeholder=f == "x",
      image_start_token_ids=cfg["image_start_token_ids"],
      max_tag_tokens=12,
    )
    assert int(layout.num_groups[0]) == int(out[f]["tile_mask"].sum()) == 4
    tags = ["<tile_1>", "<tile_2>", g, g]
    for j, tag in enumerate(tags):
      start, n = int(layout.tag_start[0, j]), int(layout.tag_length[0, j])
      assert ids[0, start : start + n].tolist() == tokenizer.encode(tag), (f, tag)
    np.testing.assert_array_equal(np.asarray(layout.run_length[0]), [1, 1, 1, 1] if f == "x" else [1, 1, 16, 16])
  with pytest.raises(ValueError, match="needs tile tags"):
    from nvlm_jax.processing.processor import Processor

    Processor(tokenizer, image_size=56, patch_size=7, fusion="h", tile_tag_format="none")


def test_generate_from_processor_prompts(tokenizer):
  """The whole path: Processor(fusion=x|h) -> generate(): batched, left-aligned, with a 2+1-tile and a 1x1
  image, equals recomputing the full sequence for each row."""
  rng = np.random.default_rng(1)
  images = [
    Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)),
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)),
  ]
  convs = [[{"role": "user", "content": "<image>\nWhat is it?"}], [{"role": "user", "content": "Name <image> now."}]]
  for variant in ("x", "h"):
    proc = processor(tokenizer, variant)
    batch = proc(convs, [[images[0]], [images[1]]], add_generation_prompt=True)
    cfg = get_preset(
      f"tiny_nvlm_{variant}",
      llm=get_preset("tiny_llm").replace(num_layers=4, vocab_size=512),
      cross_attention=CrossAttentionConfig(every=2, max_tag_tokens=12),
      **proc.model_token_ids(),
    )
    model = CLASSES[variant](cfg)
    params = random_params(model, seed=7, gate=0.8)
    new = 4
    tokens = np.asarray(
      generate(
        model,
        params,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        tile_mask=batch["tile_mask"],
        max_new_tokens=new,
        eos_token_id=-1,
      )
    )
    forward = jax.jit(
      lambda p, ids, seg, px, tm: model.apply({"params": p}, ids, segment_ids=seg, pixel_values=px, tile_mask=tm),
      compiler_options=O0,
    )
    lengths = batch["attention_mask"].sum(axis=1)
    seq = np.zeros((2, batch["input_ids"].shape[1] + new), np.int32)  # right-padded, as the processor pads
    seq[:, : batch["input_ids"].shape[1]] = batch["input_ids"] * batch["attention_mask"]
    for step in range(new):
      seg = (np.arange(seq.shape[1])[None] < (lengths + step)[:, None]).astype(np.int32)
      logits = np.asarray(forward(params, seq, seg, batch["pixel_values"], batch["tile_mask"]))
      for row in range(2):
        seq[row, lengths[row] + step] = np.argmax(logits[row, lengths[row] + step - 1])
    expected = np.stack([seq[row, lengths[row] : lengths[row] + new] for row in range(2)])
    np.testing.assert_array_equal(tokens, expected, err_msg=f"NVLM-{variant.upper()}")


# ----------------------------------------------------------------------------------------------------
# Config, presets, parameter layout, building from released parts.


def test_config_checks_and_presets():
  from nvlm_jax.presets import PRESETS

  assert {"nvlm_x_72b", "nvlm_h_72b", "nvlm_x_34b", "nvlm_h_34b", "tiny_nvlm_x", "tiny_nvlm_h"} <= set(PRESETS)
  assert get_preset("nvlm_x_72b").cross_attention.positions(80) == tuple(range(7, 80, 8))
  assert get_preset("nvlm_h_34b").cross_attention.positions(60) == tuple(range(5, 60, 6))
  assert get_preset("nvlm_x_72b").projector.num_layers == 1 and get_preset("nvlm_h_72b").projector.num_layers == 2
  cfg = get_preset("tiny_nvlm_x")
  with pytest.raises(ValueError, match="every=3 does not divide"):
    cfg.replace(cross_attention=CrossAttentionConfig(every=3))
  with pytest.raises(ValueError, match="set how many LLM layers"):
    cfg.replace(cross_attention=CrossAttentionConfig())
  with pytest.raises(ValueError, match="NVLMX needs an NVLMConfig with variant 'x'"):
    NVLMX(get_preset("tiny_nvlm_h")).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  cfg = config_for("h")
  assert models.config_from_description(models.describe_model(cfg)) == cfg
  assert type(models.module_for_config(cfg)) is NVLMH


def test_unrolled_decoder_computes_the_same_and_params_round_trip():
  """scan_layers=False (names layers_{i} / cross_attn_{g}) gives the same logits; the LLM <-> X/H param
  reshape is exact both ways."""
  cfg = config_for("x")
  model = NVLMX(cfg)
  params = random_params(model, seed=3, gate=0.6)
  flat_cfg = cfg.replace(llm=cfg.llm.replace(scan_layers=False))
  flat = NVLMX(flat_cfg)
  lm = params["language_model"]
  llm = llm_params_from_cross_attention(lm, cfg)
  np.testing.assert_array_equal(
    llm_to_cross_attention_params(llm, cfg)["decoder"]["groups"]["layers_after"]["mlp"]["up_proj"]["kernel"],
    lm["decoder"]["groups"]["layers_after"]["mlp"]["up_proj"]["kernel"],
  )
  unstacked = {f"layers_{i}": jax.tree.map(lambda x: x[i], llm["decoder"]["layers"]) for i in range(4)}
  blocks = {f"cross_attn_{g}": jax.tree.map(lambda x: x[g], lm["decoder"]["groups"]["cross_attn"]) for g in range(2)}
  flat_params = {
    **params,
    "language_model": {**{k: v for k, v in lm.items() if k != "decoder"}, "decoder": {**unstacked, **blocks}},
  }
  ids, seg, pixels, mask, _ = hand_batch("x", seed=6)
  run = lambda m, p: m.apply(
    {"params": p}, jnp.asarray(ids[:1]), pixel_values=jnp.asarray(pixels[:1]), tile_mask=jnp.asarray(mask[:1])
  )
  jitted = jax.jit(run, static_argnums=0, compiler_options=O0)
  np.testing.assert_allclose(
    np.asarray(jitted(flat, flat_params)), np.asarray(jitted(model, params)), atol=1e-5, rtol=0
  )


def test_every_param_has_logical_axes_the_rules_can_place():
  """Every X/H param is logically partitioned; on a (data, fsdp, tensor) mesh the blocks shard like the
  LLM's layers (heads / mlp over tensor, embed over fsdp) with their stacked axes unsharded."""
  from jax.sharding import PartitionSpec as P

  from nvlm_jax import sharding

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS before jax loads)")
  mesh = sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  for variant in ("x", "h"):
    model = CLASSES[variant](config_for(variant))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    specs = nn.get_partition_spec(boxed)["language_model"]["decoder"]["groups"]
    assert specs["cross_attn"]["q_proj"]["kernel"] == P("layer_groups", "embed", "heads", "head_dim")
    assert specs["cross_attn"]["attn_gate"] == P("layer_groups")
    assert specs["layers_before"]["mlp"]["up_proj"]["kernel"] == P("layer_groups", "layers", "embed", "mlp")
    shardings = sharding.shardings_for(boxed, mesh)["language_model"]["decoder"]["groups"]
    assert shardings["cross_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["cross_attn"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")


def test_sharded_forward_equals_single_device(tiny):
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from nvlm_jax import sharding

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  variant, model, params, forward = tiny
  ids, seg, pixels, mask, _ = hand_batch(variant)
  expected = np.asarray(forward(params, ids, seg, pixels, mask))
  mesh = sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  sharded = jax.device_put(params, sharding.shardings_for(boxed, mesh))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda x: jax.device_put(jnp.asarray(x), batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    got = forward(sharded, put(ids), put(seg), put(pixels), put(mask))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def param_count(cfg) -> int:
  model = models.module_for_config(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def block_params(llm) -> int:
  """One gated cross-attention block: q/o, k/v, SwiGLU, attn/memory/mlp norms, q/k norms, two gates."""
  d, hd = llm.hidden_size, llm.kv_head_dim
  return 2 * d * llm.num_heads * hd + 2 * d * llm.num_kv_heads * hd + 3 * d * llm.intermediate_size + 3 * d + 2 * hd + 2


def projector_params(p) -> int:
  widths = (
    [(p.in_features, p.out_features)]
    if p.num_layers == 1
    else [(p.in_features, p.hidden_size), (p.hidden_size, p.out_features)]
  )
  return 2 * p.in_features + sum(a * b for a, b in widths)


def test_full_size_parameter_counts():
  d_counts = {"72b": 78_863_416_704, "34b": 40_334_383_488}  # tests/test_nvlm_d.py
  for size in ("72b", "34b"):
    d = get_preset(f"nvlm_d_{size}")
    for variant in ("x", "h"):
      cfg = get_preset(f"nvlm_{variant}_{size}")
      count = param_count(cfg)
      print(f"nvlm_{variant}_{size}: {count:,} parameters ({block_params(cfg.llm):,} per gated block)")
      assert count == (
        d_counts[size] - projector_params(d.projector) + projector_params(cfg.projector) + 10 * block_params(cfg.llm)
      )


@pytest.mark.parametrize("layers,every,offset", [(8, 4, 3), (8, 4, 0), (6, 2, 1), (6, 3, None), (12, 12, 11)])
def test_one_layer_group_rule_serves_cache_params_and_streaming(layers, every, offset):
  """split_layer_groups (KV cache, in-memory params) and layer_slot (streamed stitch) place LLM layer i at the same
  (stack, group, index), computed here from i = g * every + j directly; merge_layer_groups undoes the split."""
  xc = CrossAttentionConfig(every=every, offset=offset)
  stacked = {"k": np.random.default_rng(0).normal(size=(layers, 2, 3)).astype(np.float32)}
  grouped = split_layer_groups(stacked, xc, layers)
  first_after = every - 1 if offset is None else offset
  for i in range(layers):
    g, j = divmod(i, every)
    name, index = ("layers_before", j) if j < first_after else ("layers_after", j - first_after)
    assert xc.layer_slot(i) == (name, g, index)
    np.testing.assert_array_equal(np.asarray(grouped[name]["k"][g, index]), stacked["k"][i])
  np.testing.assert_array_equal(np.asarray(merge_layer_groups(grouped, xc, layers)["k"]), stacked["k"])
