-- Several scenes from one graph: a loop builds one text-to-image branch per scene, all sharing
-- the loaded demo model. Edit the list and re-run (or `ditflow watch` it): only new or changed
-- scenes are computed again.
--   ditflow run graphs/scenes.lua
description("One text-to-image branch per scene, sharing one loaded model.")
local demo = require("lib.demo")

local scenes = {
  {name = "sunrise", prompt = "a large yellow circle at the top on a orange background"},
  {name = "night",   prompt = "a small white circle on the right on a black background"},
  {name = "field",   prompt = "a large green square at the bottom on a blue background"},
  {name = "sail",    prompt = "a large white triangle in the center on a blue background"},
}

local models = demo.load(input("models", "String", {default = "../models/demo"}))
local seed = input("seed", "Int", {default = 0})
local steps = input("steps", "Int", {default = 20})

for i, scene in ipairs(scenes) do
  local save = demo.branch(models, "_" .. scene.name, {
    prompt = scene.prompt, negative = "", seed = seed, steps = steps, cfg = 4.0,
    out = "scene_" .. i .. "_" .. scene.name .. ".png", scale = 4,
  })
  output(scene.name, save.path)
end
