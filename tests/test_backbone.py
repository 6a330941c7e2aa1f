"""The backbone wrapper against open_clip's own forward passes."""
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g)


def test_encode_image_equals_open_clip(micro_backbone, images):
    bb = micro_backbone
    with torch.no_grad():
        ours = bb.encode_image(images).pooled
        ref = bb.model.encode_image(images)
    assert torch.equal(ours, ref)


TEXTS = ["a photo of a red finch.", "a photo of a thing with a long name, a type of bird.", "a bird."]


def _block_lengths(bb):
    """Records the sequence length each text block runs on (a forward pre-hook on block 0)."""
    seen = []
    blk = bb.model.transformer.resblocks[0]
    return seen, blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))


def test_encode_text_equals_open_clip_when_not_shortened(micro_backbone):
    bb = micro_backbone
    tokens = bb.tokenize(TEXTS)
    bb.short_text = False
    try:
        with torch.no_grad():
            ours = bb.encode_text_embeddings(bb.token_embedding(tokens), tokens)
            ref = bb.model.encode_text(tokens)
    finally:
        bb.short_text = True
    assert torch.equal(ours, ref)


def _full_and_short(bb, tokens):
    """open_clip's full-length text features, the wrapper's, and the sequence lengths its blocks saw."""
    with torch.no_grad():
        ref = bb.model.encode_text(tokens)
    seen, hook = _block_lengths(bb)
    try:
        with torch.no_grad():
            ours = bb.encode_text(tokens)
    finally:
        hook.remove()
    return ref, ours, seen


def test_shortened_text_tower_equals_open_clip_within_rounding(micro_backbone):
    """Prompts of different lengths in one batch: the tower runs up to the longest EOT only, and
    every prompt's feature (short ones included) is open_clip's full-length one within fp32 rounding."""
    bb = micro_backbone
    tokens = bb.tokenize(TEXTS)
    eot = tokens.argmax(-1)
    assert len(set(eot.tolist())) == 3 and int(eot.max()) + 1 < tokens.shape[1]
    ref, ours, seen = _full_and_short(bb, tokens)
    assert seen == [int(eot.max()) + 1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # each prompt alone (its own, shorter length) gives the same feature too
    for i in range(len(TEXTS)):
        with torch.no_grad():
            torch.testing.assert_close(bb.encode_text(tokens[i:i + 1])[0], ref[i], rtol=1e-5, atol=1e-5)


def test_shortened_text_tower_deep_prompts_and_gradients(micro_backbone):
    """Deep prompts (MaPLe) sit before the EOT: features and the gradients reaching the learned
    context and deep prompts agree with the full-length tower within fp32 rounding."""
    bb = micro_backbone
    tokens = bb.tokenize(["x x x red finch.", "x x x bird with a very long name indeed."])
    g = torch.Generator().manual_seed(3)
    emb0 = bb.token_embedding(tokens).detach()
    ctx = torch.randn(3, bb.text_width, generator=g).requires_grad_(True)
    deep = [None] + [torch.randn(3, bb.text_width, generator=g).requires_grad_(True)
                     for _ in range(bb.text_layers - 1)]
    w = torch.randn(2, bb.embed_dim, generator=g)

    def run(short):
        bb.short_text = short
        try:
            emb = torch.cat([emb0[:, :1], ctx.expand(2, -1, -1), emb0[:, 4:]], 1)
            out = bb.encode_text_embeddings(emb, tokens, deep_prompts=deep, prompt_start=1)
        finally:
            bb.short_text = True
        grads = torch.autograd.grad((out * w).sum(), [ctx] + deep[1:])
        return out.detach(), grads

    seen, hook = _block_lengths(bb)
    try:
        full, g_full = run(False)
        short, g_short = run(True)
    finally:
        hook.remove()
    assert seen == [tokens.shape[1], int(tokens.argmax(-1).max()) + 1]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_short, g_full):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_shortened_text_tower_keeps_all_positions_without_causal_mask(micro_backbone):
    """Without a causal mask later positions reach the EOT: the tower then runs every position."""
    import copy

    bb = copy.deepcopy(micro_backbone)
    tokens = bb.tokenize(TEXTS)
    bb.model.attn_mask = torch.zeros_like(bb.model.attn_mask)  # bidirectional attention
    ref, ours, seen = _full_and_short(bb, tokens)
    assert seen == [tokens.shape[1]]
    assert torch.equal(ours, ref)


def test_patch_tokens_are_open_clip_tokens_projected(micro_backbone, images):
    bb = micro_backbone
    v = bb.model.visual
    v.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = v(images)  # open_clip: tokens after ln_post, not projected
    finally:
        v.output_tokens = False
    out = bb.encode_image(images, return_patches=True)
    assert out.patches.shape == (4, bb.num_patches, bb.embed_dim)
    torch.testing.assert_close(out.patches, tokens @ v.proj, rtol=0, atol=1e-6)
    assert torch.equal(out.pooled, pooled)


def _manual_vision(bb, images, prompts, deep):
    """Block-by-block reference written against open_clip modules directly."""
    v = bb.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    n = prompts.shape[0]
    x = v.ln_pre(torch.cat([x, prompts.expand(x.shape[0], -1, -1)], 1))
    for j, blk in enumerate(v.transformer.resblocks):
        if 1 <= j < len(deep) and deep[j] is not None:
            x = torch.cat([x[:, :-n], deep[j].expand(x.shape[0], -1, -1)], 1)
        x = blk(x)
    x = v.ln_post(x)
    return x[:, 0] @ v.proj, x[:, -n:] @ v.proj


def test_deep_visual_prompts_match_manual_forward(micro_backbone, images):
    bb = micro_backbone
    g = torch.Generator().manual_seed(1)
    W = bb.vision_width
    prompts = torch.randn(2, W, generator=g)
    deep = [None, torch.randn(2, W, generator=g)]  # replaced at block 1, propagates at block 2
    out = bb.encode_image(images, prompts=prompts, deep_prompts=deep, return_prompts=True)
    ref_pooled, ref_prompts = _manual_vision(bb, images, prompts, deep)
    torch.testing.assert_close(out.pooled, ref_pooled)
    torch.testing.assert_close(out.prompts, ref_prompts)
    # the deep prompt matters: replacing it changes the output
    out2 = bb.encode_image(images, prompts=prompts, deep_prompts=[None, deep[1] * -2.0])
    assert not torch.allclose(out.pooled, out2.pooled)


def test_deep_text_prompts_replace_positions(micro_backbone):
    bb = micro_backbone
    tokens = bb.tokenize(["x x x red finch."])
    emb = bb.token_embedding(tokens)
    g = torch.Generator().manual_seed(2)
    deep = [None, torch.randn(3, bb.text_width, generator=g)]
    ours = bb.encode_text_embeddings(emb, tokens, deep_prompts=deep)
    m = bb.model
    x = emb + m.positional_embedding
    for j, blk in enumerate(m.transformer.resblocks):
        if j == 1:
            x = torch.cat([x[:, :1], deep[1].unsqueeze(0), x[:, 4:]], 1)
        x = blk(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    ref = x[torch.arange(1), tokens.argmax(-1)] @ m.text_projection
    torch.testing.assert_close(ours, ref)


def test_value_local_features_follow_locoop(micro_backbone, images):
    bb = micro_backbone
    v = bb.model.visual
    out = bb.encode_image(images, return_value_local=True)
    # reference: run all blocks but the last, then the last block's value path by hand
    x = v._embeds(images)
    blocks = v.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    W = x.shape[-1]
    val = last.ln_1(x) @ last.attn.in_proj_weight[2 * W:].t() + last.attn.in_proj_bias[2 * W:]
    val = last.attn.out_proj(val)
    y = x + val
    y = y + last.mlp(last.ln_2(y))
    ref = v.ln_post(y[:, 1:]) @ v.proj
    torch.testing.assert_close(out.value_local, ref)
    torch.testing.assert_close(out.pooled, bb.model.encode_image(images))


def test_backbone_is_frozen_and_lists_attention(micro_backbone):
    bb = micro_backbone
    assert not any(p.requires_grad for p in bb.parameters())
    mods = bb.attention_modules()
    assert len(mods) == bb.vision_layers + bb.text_layers
    assert all(isinstance(m, torch.nn.MultiheadAttention) for _, _, m in mods)
    bb.train()
    assert not bb.model.training


def test_bad_pretrained_path_is_a_clear_error():
    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from benchmark.errors import BenchmarkError, UnknownNameError

    with pytest.raises(BenchmarkError, match="no file is there"):
        CLIPBackbone.load(BackboneConfig(model="ViT-B-16", pretrained="/nonexistent/clip.pt"))
    with pytest.raises(UnknownNameError, match="ViT-B-16"):
        CLIPBackbone.load(BackboneConfig(model="ViT-B-61", pretrained=""))


def test_compiled_blocks_agree_and_uncompile_for_copies(images):
    """train.compile: compiled blocks give the eager features; switching off restores the eager
    call, so a deep copy (LoRA's private backbone) runs its own blocks, not the original's."""
    import copy

    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from conftest import MICRO, MICRO_CKPT

    bb = CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=MICRO_CKPT))  # private: we edit it
    prompts = torch.randn(images.shape[0], 2, bb.vision_width)
    with torch.no_grad():
        eager = bb.encode_image(images, prompts=prompts, return_patches=True)
        bb.set_compiled(True, backend="aot_eager")  # the wiring; inductor needs a C++ toolchain
        blk = bb.model.visual.transformer.resblocks[0]
        assert blk._compiled_call_impl is not None
        comp = bb.encode_image(images, prompts=prompts, return_patches=True)
        torch.testing.assert_close(comp.pooled, eager.pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comp.patches, eager.patches, rtol=1e-5, atol=1e-5)
        bb.set_compiled(False)
        assert all(b._compiled_call_impl is None for b in bb.model.visual.transformer.resblocks)
        twin = copy.deepcopy(bb)
        with torch.no_grad():
            twin.model.visual.transformer.resblocks[-1].mlp.c_proj.weight.zero_()
        changed = twin.encode_image(images).pooled
        assert not torch.allclose(changed, bb.encode_image(images).pooled)
