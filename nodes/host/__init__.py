"""The host adapter: the only code of the pack that touches ComfyUI internals, one module per mechanism.

- ``family``: which model a patch is given (family, attention sites, sigma / timestep / prediction space);
- ``runs``: per-run state (``RunScope``) and the latent check;
- ``evaluation``: hooks on the sampler's model evaluations (guidance terms, CFG per step, a second model, an
  extra conditional pass);
- ``attention``: perturbed self-attention on UNets and DiTs;
- ``cross_attention``: Prompt-to-Prompt's attention control (source maps injected into a target branch);
- ``negative_attention``: cross-attention that also reads a negative prompt and steers away from it (NASA; on
  DiTs through one more batch row carrying the negative text);
- ``convolution``: UNet convolutions wrapped through object patches and run re-dilated per evaluation
  (ScaleCrafter);
- ``building``: models built from ComfyUI's own classes (the reference models);
- ``sampling_loop``: the pack's own sampling loops run inside ComfyUI's guider (inversion and its replay);
- ``samplers``: the pack's own samplers (CFG++, momentum) as SAMPLER objects;
- ``classifier``: the Diffusion Classifier's denoising errors per candidate prompt;
- ``judging``: judges read inside a sampling run (a clean estimate decoded for an image classifier, or
  denoised under each of a prompt judge's prompts), and one more prompt's prediction;
- ``clip_judge``: CLIP as a judge (a CLIP vision model's image embeddings against a CLIP's projected text
  embeddings);
- ``cascade``: sampling in stages of growing resolution (FreCaS) as a SAMPLER;
- ``feature_cache``: features kept across sampling steps and reused (DeepCache on UNets, block caching on DiTs);
- ``gradients``: gradients through the model despite ComfyUI's inference mode (null-text inversion);
- ``pixel_loss``: latents decoded to pixels with gradients through the VAE (the restorers' measurement loss);
- ``scorer_guidance``: a scorer's gradient with respect to a clean estimate, through the VAE decoder (EluCD);
- ``restoration``: restoration by optimising the latent against a measurement (RED-diff) as a SAMPLER;
- ``steering``: Steered Diffusion's sampler (each step's clean estimate corrected by the measurement loss);
- ``search``: inference-time search over Euler ancestral paths scored by a scorer (tree sampling, latent beam
  search, best-of-N) as SAMPLERs;
- ``dpm_encoder``: CycleDiffusion's DPM latents (which ComfyUI sampler a SAMPLER runs, their replay as a SAMPLER,
  their files);
- ``inversion_store``: inversions as files in ComfyUI's folders, and the model fingerprint they carry;
- ``schedule_store``: cache schedules as files in ComfyUI's folders and the pack's presets;
- ``calibration_store``: LinearAG calibrations as files in ComfyUI's folders;
- ``files``: what the stores share (listing, lookup by plain name, numbered new names).

A new mechanism (an own sampling loop, gradients through the model, caches across steps, a cascade of
resolutions) gets a module of its own here. Everything goes through ComfyUI's sanctioned hooks; differences
between ComfyUI versions are found by feature probes (listed by ``probes()``), never by version strings. Node
modules use this package and ``guidance_ops``, nothing else.
"""
from .classifier import denoising_errors, timestep_sigmas
from .judging import judge_log_probs, predict_prompt, prepare_judge, prepare_prompts, score_latents
from .clip_judge import clip_judge_from
from .cascade import Plan as CascadePlan
from .cascade import cascade_sampler, cascade_sigmas
from .attention import FLUX_STATES_IMG_SLICE, HAS_ATTENTION_OVERRIDE, perturb_self_attention
from .building import (build_diffusion_model, build_flux_text_encoder, build_kl_autoencoder, build_sd1_text_encoder,
                       flux_state_dict_for_saving, load_reference_model, unpack_weights)
from .convolution import RedilatedConv, predict_weak_uncond, redilate_convolutions, unet_conv_sites
from .feature_cache import cache_scope, dit_blocks, unit_shares, install_block_cache, install_deepcache, unet_depth
from .feature_cache import report as cache_report
from .cross_attention import (PromptToPromptController, encode_text, install_prompt_to_prompt, prompt_token_ids,
                              word_token_ids)
from .negative_attention import (count_evaluations, cross_attention_modules, cross_attention_sites, context_width,
                                 joint_attention_layers, steer_cross_attention)
from .evaluation import (add_extra_cond_pass, add_guidance_delta, add_post_cfg, add_run_conditioning, attach_model,
                         override_cfg_per_evaluation, predict_with, process_latent_in, replace_uncond_with_guide,
                         run_conditioning, uncond_pass_runs)
from .gradients import differentiating, trainable
from .pixel_loss import PixelDecoder
from .scorer_guidance import ScorerGradient
from .restoration import RestorationError, red_diff_sampler
from .restoration import Settings as RedDiffSettings
from .steering import steered_sampler
from .search import SearchError, minimum_budget, search_sampler
from .dpm_encoder import DPM_SUBFOLDER, flow_noise_scale, identify_sampler, replay_sampler
from .dpm_encoder import file_stamp as dpm_latent_file_stamp
from .dpm_encoder import load as load_dpm_latent
from .dpm_encoder import save as save_dpm_latent
from .dpm_encoder import saved_names as saved_dpm_latents
from .inversion_store import SUBFOLDER, as_conditioning, conditioning_tensors, fingerprint
from .inversion_store import file_stamp as inversion_file_stamp
from .inversion_store import load as load_inversion
from .inversion_store import save as save_inversion
from .inversion_store import saved_names as saved_inversions
from .sampling_loop import (empty_latent, interrupted, progress_bar, run_loop, sample_latent, sampler_names,
                            scheduler_names, throw_if_interrupted)
from .calibration_store import SUBFOLDER as CALIBRATION_SUBFOLDER
from .calibration_store import file_stamp as calibration_file_stamp
from .calibration_store import load as load_calibration
from .calibration_store import save as save_calibration
from .calibration_store import saved_names as saved_calibrations
from .schedule_store import SUBFOLDER as SCHEDULE_SUBFOLDER
from .schedule_store import file_stamp as schedule_file_stamp
from .schedule_store import load as load_schedule
from .schedule_store import save as save_schedule
from .schedule_store import saved_names as saved_schedules
from .family import (DIT_FAMILIES, FAMILY_NAMES, UNET_FAMILIES, UnsupportedModel, attention_layers, is_flow_model,
                     latent_channels, model_family, model_sampling, percent_to_sigma, prediction_space, require_family,
                     require_same_family, same_family, sigma_to_timestep, sigma_window)
from .samplers import alpha_function, denoising_sampler, guided_sampler
from .runs import (CLONE_DEEP_COPIES_OBJECTS, PatchInput, RunScope, Wrappers, check_latent, guard_latent,
                   new_key, run_reports, step_of)


def probes():
    """The feature probes and the branch this ComfyUI takes: ``{name: (value, kind)}``. A 'branch' probe picks
    between two code paths that differ between supported versions (the test hosts must cover both); a
    'requirement' is a hook the pack needs and every supported version has."""
    return {"clone_deep_copies_objects": (CLONE_DEEP_COPIES_OBJECTS, "branch"),
            "flux_states_img_slice": (FLUX_STATES_IMG_SLICE, "branch"),
            "attention_override_hook": (HAS_ATTENTION_OVERRIDE, "requirement")}
