"""An embedded, Stable-Diffusion-shaped latent diffusion model that knows weather (trained here, shipped here).

- `data`: the training and held-out sets: crops of redistributable scikit-image photos, each rendered clean
  and with the project's physical rain, haze and snow (`pipelines.weather`), each with its caption.
- `stats`: per-weather statistics (rain streak energy, haze dark channel, snow blob density) and content kept.
- `vae`: a small `diffusers.AutoencoderKL`, its loss, training and evaluation (the 4x vs 8x choice).
- `unet`: a small `diffusers.UNet2DConditionModel` with cross-attention, epsilon-prediction training on the
  VAE latents, conditioned on a text encoder passed in as an argument.
- `folder`: writing the diffusers folder (vae/, unet/, scheduler/, text_encoder/, tokenizer/).
- `loop`: the seeded, resumable training loop both models share.
- `probe`: does a weather caption put its weather on a clean photo under CCD (synth.ccd)?

`bench/train_weather_sd.py` runs the whole training.
"""
