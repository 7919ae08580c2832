-- Building blocks for graphs on the bundled demo model (models/demo): used by text_to_image.lua
-- and scenes.lua through require("lib.demo").
local demo = {}

-- Loads the demo model's text encoder, transformer and VAE from the folder `models` (a graph
-- input or a path relative to the graph) and returns the loader nodes and the scheduler config.
function demo.load(models)
  local function path(id, sub)
    return node(id, "FormatString", {template = "{a}/" .. sub, a = models}).text
  end
  return {
    te = node("te", "LoadTextEncoder", {path = path("te_path", "text_encoder")}),
    dit = node("dit", "LoadDiffusionModel", {path = path("dit_path", "transformer")}),
    vae = node("vae", "LoadVAE", {path = path("vae_path", "vae")}),
    scheduler = path("sched_path", "scheduler/scheduler_config.json"),
  }
end

-- One text-to-image branch: prompt -> T5 -> PixArt (flow-matching Euler with guidance) -> VAE ->
-- PNG. Node ids get `suffix` so several branches can share one graph; `opts` holds prompt,
-- negative, seed, steps, cfg, out and scale (constants or graph inputs), and optionally
-- preview_every and preview_map (Sample's previews).
function demo.branch(m, suffix, opts)
  local function id(name) return name .. suffix end
  local pos = node(id("pos"), "TextEncode", {encoder = m.te.encoder, text = opts.prompt})
  local neg = node(id("neg"), "TextEncode", {encoder = m.te.encoder, text = opts.negative})
  local latent = node(id("latent"), "EmptyLatent", {width = 64, height = 64, channels = 4, downscale = 4})
  local sample = node(id("sample"), "Sample", {
    model = m.dit.model, positive = pos.conditioning, negative = neg.conditioning,
    latent = latent.latent, sampler = "auto", scheduler_config = m.scheduler,
    steps = opts.steps, cfg = opts.cfg, seed = opts.seed,
    preview_every = opts.preview_every, preview_map = opts.preview_map,
  })
  local decode = node(id("decode"), "VAEDecode", {vae = m.vae.vae, latent = sample.latent})
  return node(id("save"), "SaveImage", {image = decode.image, path = opts.out, scale = opts.scale})
end

return demo
