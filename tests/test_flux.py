"""common.py's FLUX section against diffusers' own pipeline helpers (the code the real checkpoints were used with)."""

import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

import common


def test_pack_matches_diffusers_and_unpack_inverts_it():
    x = torch.randn(2, 4, 6, 8)
    ours = common.flux_pack(x)
    assert torch.equal(ours, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(common.flux_unpack(ours, 6, 8), x)
    # diffusers' unpack takes pixel sizes and a VAE factor of 8 (it rounds to 2 * (H // 16))
    assert torch.equal(FluxPipeline._unpack_latents(ours, 48, 64, 8), x)


def test_ids_match_diffusers_and_place_frames_and_offsets():
    ids = common.flux_ids(3, 5)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    shifted = common.flux_ids(2, 2, frame=3, row=4, col=7)
    assert shifted.tolist() == [[3, 4, 7], [3, 4, 8], [3, 5, 7], [3, 5, 8]]


@pytest.fixture(scope="module")
def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], guidance_embeds=True).eval()


def test_velocity_equals_a_direct_call_cut_to_the_target(tiny_flux):
    x, refs = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    text, pooled, sigma = torch.randn(2, 3, 16), torch.randn(2, 16), torch.tensor([0.3, 0.9])
    ids = torch.cat([common.flux_ids(2, 2), common.flux_ids(2, 3, frame=1)])
    with torch.no_grad():
        ours = common.flux_velocity(tiny_flux, x, refs, text, pooled, ids, sigma, 2.5)
        full = tiny_flux(hidden_states=torch.cat([x, refs], 1), encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=sigma, img_ids=ids, txt_ids=torch.zeros(3, 3), guidance=torch.full((2,), 2.5)).sample
        alone = common.flux_velocity(tiny_flux, x, refs[:, :0], text, pooled, ids[:4], sigma, 2.5)
    assert ours.dtype == torch.float32 and torch.equal(ours, full[:, :4])
    assert not torch.allclose(ours, alone)  # the target attends to the reference tokens


def test_vae_encode_decode_apply_the_config_shift_and_scale():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=1,
                        shift_factor=0.25, scaling_factor=2.0).eval()
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = common.vae_encode(vae, images)
        assert torch.allclose(z, (vae.encode(images).latent_dist.mean - 0.25) * 2.0)
        assert torch.allclose(common.vae_decode(vae, z), vae.decode(z / 2.0 + 0.25).sample.clamp(-1, 1))


def test_empty_prompt_is_named():
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        common.encode_flux_prompts(["a cat", "  "], None, None, None, None, 8, torch.float32)
