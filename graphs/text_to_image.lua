-- The Lua twin of text_to_image.yaml: the same graph, built from the lib/demo.lua module.
--   ditflow run graphs/text_to_image.lua --set prompt="a small white triangle on the left on a green background"
description("Text to image with the bundled demo model.")
local demo = require("lib.demo")

local opts = {
  prompt = input("prompt", "String", {default = "a red circle on a blue background",
    doc = "a colour and a shape (circle, square, triangle), optionally small or large and a place (in the center, on the left, ...), on a background colour"}),
  negative = input("negative", "String", {default = "", doc = "the unconditional prompt"}),
  seed = input("seed", "Int", {default = 0}),
  steps = input("steps", "Int", {default = 20}),
  cfg = input("cfg", "Float", {default = 4.0}),
  out = input("out", "String", {default = "text_to_image.png"}),
  scale = input("scale", "Int", {default = 4, doc = "the PNG is written at this multiple of the model's 64x64 (nearest neighbour)"}),
}
local models = input("models", "String", {default = "../models/demo", doc = "the demo model folder, relative to this file"})
opts.preview_every = input("preview_every", "Int", {default = 5,
  doc = "a 16x16 preview of the picture forming every this many steps (node_preview events; 0: none)"})
opts.preview_map = node("rgb_path", "FormatString", {template = "{a}/vae/latent_rgb.json", a = models}).text

local save = demo.branch(demo.load(models), "", opts)
output("image", save.path)
