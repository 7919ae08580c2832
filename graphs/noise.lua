-- The Lua twin of noise.yaml: the same graph, built by a script. Try:
--   ditflow run graphs/noise.lua --set seed=7
description("Seeded counter-based noise rendered to a PNG.")
local seed = input("seed", "Int", {default = 0, doc = "noise seed: the same seed gives the same image everywhere"})
local size = input("size", "Int", {default = 96, doc = "image width and height in pixels"})

local noise = node("noise", "RandomNoise", {seed = seed, width = size, height = size, channels = 3})
local image = node("image", "NoiseToImage", {latent = noise.noise, scale = 0.2})
local save = node("save", "SaveImage", {image = image.image, path = "noise.png"})
local as_tensor = node("as_tensor", "LatentToTensor", {latent = noise.noise})
local stats = node("stats", "TensorStats", {tensor = as_tensor.tensor})
local caption = node("caption", "FormatString", {
  template = "seed {a}: mean {b}, std {c}", a = seed, b = stats.mean, c = stats.std,
})
output("image", save.path)
output("caption", caption.text)
