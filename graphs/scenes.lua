-- Several scenes from one graph: a loop builds one text-to-image branch per scene, all sharing
-- the loaded demo model. Edit the list and re-run (or `ditflow watch` it): only new or changed
-- scenes are computed again.
--   ditflow run graphs/scenes.lua
description("One text-to-image branch per scene, sharing one loaded model.")
local demo = require("lib.demo")

local scenes = {
  {name = "sunrise", shape = "large yellow circle", place = "at the top", background = "orange"},
  {name = "night",   shape = "small white circle", place = "on the right", background = "black"},
  {name = "field",   shape = "large green square", place = "at the bottom", background = "blue"},
  {name = "sail",    shape = "large white triangle", place = "in the center", background = "blue"},
}

-- A Lua node: glue logic that runs as a node (cached like any other), here a prompt template.
lua_node("Prompt", {
  doc = "The demo model's caption for a shape, a place and a background colour.",
  inputs = "shape: String, place: String, background: String",
  outputs = "prompt: String",
  fn = function(inputs)
    return string.format("a %s %s on a %s background", inputs.shape, inputs.place, inputs.background)
  end,
})

local models = demo.load(input("models", "String", {default = "../models/demo"}))
local seed = input("seed", "Int", {default = 0})
local steps = input("steps", "Int", {default = 20})

for i, scene in ipairs(scenes) do
  local prompt = node("prompt_" .. scene.name, "Prompt",
    {shape = scene.shape, place = scene.place, background = scene.background})
  local save = demo.branch(models, "_" .. scene.name, {
    prompt = prompt.prompt, negative = "", seed = seed, steps = steps, cfg = 4.0,
    out = "scene_" .. i .. "_" .. scene.name .. ".png", scale = 4,
  })
  output(scene.name, save.path)
end
