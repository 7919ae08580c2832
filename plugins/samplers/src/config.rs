//! Schedulers by name and from diffusers' `scheduler_config.json` files: the sampler names the
//! sampling nodes accept, the config file's fields (Python's JSON constants quoted), and
//! [`build_scheduler`], a scheduler for a class, its fields and a step count.

use crate::{
    fail, Ddim, DdimConfig, DdimInverse, Direction, DpmSolverMultistep, DpmSolverMultistepConfig,
    EulerAncestralDiscrete, EulerDiscrete, EulerDiscreteConfig, FlowEulerInversion,
    FlowMatchEulerDiscrete, FlowMatchEulerDiscreteConfig, HeunDiscrete, HeunDiscreteConfig, Lcm,
    LcmConfig, Result, RfSolver, SamplerError, Scheduler, SigmaSource, UniPc, UniPcConfig,
};
use std::path::Path;

/// A sampler name `Sample` accepts: the diffusers class it is, and config fields it sets over the
/// model's scheduler config (JSON text).
pub struct Sampler {
    pub name: &'static str,
    pub class: &'static str,
    pub fields: &'static [(&'static str, &'static str)],
}

const fn sampler(name: &'static str, class: &'static str) -> Sampler {
    Sampler {
        name,
        class,
        fields: &[],
    }
}

/// The sampler names `Sample` accepts.
pub const SAMPLERS: &[Sampler] = &[
    sampler("ddim", "DDIMScheduler"),
    sampler("euler", "EulerDiscreteScheduler"),
    sampler("euler_ancestral", "EulerAncestralDiscreteScheduler"),
    sampler("heun", "HeunDiscreteScheduler"),
    sampler("dpmpp_2m", "DPMSolverMultistepScheduler"),
    Sampler {
        name: "dpmpp_2m_sde",
        class: "DPMSolverMultistepScheduler",
        fields: &[("algorithm_type", "\"sde-dpmsolver++\"")],
    },
    sampler("lcm", "LCMScheduler"),
    sampler("flow_euler", "FlowMatchEulerDiscreteScheduler"),
    sampler("flow_heun", "FlowMatchHeunDiscreteScheduler"),
    sampler("rf_solver", "RFSolver"),
    sampler("unipc", "UniPCMultistepScheduler"),
];

/// The inversions `Invert` accepts: sampler name, and what it inverts with.
pub const INVERSIONS: &[(&str, &str)] = &[
    ("rf_solver", "RF-Solver's inversion (flow models)"),
    ("flow_euler", "Euler up the flow sigmas (flow models)"),
    ("ddim", "DDIMInverseScheduler (epsilon, v or sample models)"),
];

/// The inversion `sampler` (one of [`INVERSIONS`]) from config fields, for `steps` steps and
/// an image of `image_seq_len` tokens (a dynamic flow shift); `flow_sigmas` as for
/// [`build_scheduler`]'s `sigmas`.
pub fn build_inversion(
    sampler: &str,
    fields: &[(String, String)],
    steps: usize,
    image_seq_len: usize,
    flow_sigmas: SigmaSource,
) -> Result<Box<dyn Scheduler>> {
    let pairs = fields.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    Ok(match sampler {
        "rf_solver" | "flow_euler" => {
            let c = FlowMatchEulerDiscreteConfig::from_fields(pairs)?;
            let mu = c.use_dynamic_shifting.then(|| c.mu(image_seq_len));
            if sampler == "rf_solver" {
                Box::new(RfSolver::new(c, steps, flow_sigmas, mu, Direction::Invert)?)
            } else {
                Box::new(FlowEulerInversion::new(c, steps, flow_sigmas, mu)?)
            }
        }
        "ddim" => Box::new(DdimInverse::new(DdimConfig::from_fields(pairs)?, steps)?),
        other => fail!(
            "unknown inversion '{other}' (known: {})",
            INVERSIONS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// The classes that take a custom list of sigmas (diffusers' `set_timesteps(sigmas=...)`).
pub const CUSTOM_SIGMA_CLASSES: &[&str] = &[
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "RFSolver",
];

/// The diffusers classes [`build_scheduler`] knows.
pub const CLASSES: &[&str] = &[
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "RFSolver",
    "UniPCMultistepScheduler",
    "DDIMInverseScheduler",
];

/// Python's JSON extensions (`Infinity`, `-Infinity`, `NaN`, which diffusers writes into scheduler
/// configs) as JSON strings, so a standard parser reads the file; strings are left alone.
pub fn quote_python_constants(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                let n = rest.chars().take(2).map(char::len_utf8).sum::<usize>();
                out.push_str(&rest[..n]);
                rest = &rest[n..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|w| rest.starts_with(**w))
        {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Reads a diffusers `scheduler_config.json` into `(key, JSON text)` pairs and its class name.
pub fn scheduler_fields(path: &Path) -> Result<(String, Vec<(String, String)>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SamplerError(format!("{}: {e}", path.display())))?;
    let text = quote_python_constants(&text);
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| SamplerError(format!("{}: not valid JSON: {e}", path.display())))?;
    let obj = json
        .as_object()
        .ok_or_else(|| SamplerError(format!("{}: expected a JSON object", path.display())))?;
    let class = obj
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    Ok((
        class,
        obj.iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
    ))
}

/// Builds the scheduler for `class` from config fields plus overrides, for `steps` steps and an
/// image of `image_seq_len` tokens (Flux's dynamic shift); `sigmas` says where the schedule's
/// sigmas come from (custom ones only for the classes in [`CUSTOM_SIGMA_CLASSES`]).
pub fn build_scheduler(
    class: &str,
    fields: &[(String, String)],
    steps: usize,
    image_seq_len: usize,
    sigmas: SigmaSource,
) -> Result<Box<dyn Scheduler>> {
    if matches!(sigmas, SigmaSource::Custom(_)) && !CUSTOM_SIGMA_CLASSES.contains(&class) {
        fail!(
            "{class} takes no custom sigmas (these do: {})",
            CUSTOM_SIGMA_CLASSES.join(", ")
        );
    }
    let pairs = fields.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    Ok(match class {
        "DDIMScheduler" => Box::new(Ddim::new(DdimConfig::from_fields(pairs)?, steps)?),
        "EulerDiscreteScheduler" => {
            let c = EulerDiscreteConfig::from_fields(pairs)?;
            Box::new(match &sigmas {
                SigmaSource::Custom(list) => EulerDiscrete::with_sigmas(c, steps, list)?,
                _ => EulerDiscrete::new(c, steps)?,
            })
        }
        "EulerAncestralDiscreteScheduler" => Box::new(EulerAncestralDiscrete::new(
            EulerDiscreteConfig::from_fields(pairs)?,
            steps,
        )?),
        "HeunDiscreteScheduler" => Box::new(HeunDiscrete::new(
            HeunDiscreteConfig::from_fields(pairs)?,
            steps,
        )?),
        "FlowMatchHeunDiscreteScheduler" => Box::new(HeunDiscrete::flow_match(
            FlowMatchEulerDiscreteConfig::from_fields(pairs)?,
            steps,
        )?),
        "LCMScheduler" => Box::new(Lcm::new(LcmConfig::from_fields(pairs)?, steps)?),
        "RFSolver" => {
            let c = FlowMatchEulerDiscreteConfig::from_fields(pairs)?;
            let mu = c.use_dynamic_shifting.then(|| c.mu(image_seq_len));
            Box::new(RfSolver::new(c, steps, sigmas, mu, Direction::Sample)?)
        }
        "DDIMInverseScheduler" => {
            Box::new(DdimInverse::new(DdimConfig::from_fields(pairs)?, steps)?)
        }
        "DPMSolverMultistepScheduler" => {
            let c = DpmSolverMultistepConfig::from_fields(pairs)?;
            Box::new(DpmSolverMultistep::new(c, steps, None)?)
        }
        "FlowMatchEulerDiscreteScheduler" => {
            let c = FlowMatchEulerDiscreteConfig::from_fields(pairs)?;
            let mu = if c.use_dynamic_shifting {
                Some(c.mu(image_seq_len))
            } else {
                None
            };
            Box::new(FlowMatchEulerDiscrete::new(c, steps, sigmas, mu)?)
        }
        "UniPCMultistepScheduler" => {
            // Pipelines that shift UniPC dynamically pass their own mu; none here does.
            let c = UniPcConfig::from_fields(pairs)?;
            Box::new(UniPc::new(c, steps, None)?)
        }
        other => fail!(
            "scheduler class \"{other}\" is not supported (supported: {})",
            CLASSES.join(", ")
        ),
    })
}

/// What a model predicts, as far as a scheduler's class and fields go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelPrediction {
    /// Not said by the model (its scheduler config decides).
    Unknown,
    Epsilon,
    V,
    Flow,
}

impl From<ditflow_plugin::model::Prediction> for ModelPrediction {
    fn from(p: ditflow_plugin::model::Prediction) -> ModelPrediction {
        use ditflow_plugin::model::Prediction as P;
        match p {
            P::Unknown => ModelPrediction::Unknown,
            P::Epsilon => ModelPrediction::Epsilon,
            P::V => ModelPrediction::V,
            P::Flow => ModelPrediction::Flow,
        }
    }
}

/// The scheduler class and config fields for a model: `sampler` by name (one of [`SAMPLERS`]),
/// or `auto` for the class of the config `file`; the file's fields, with what the model's
/// prediction needs added (UniPC on flow sigmas with `flow_prediction` for flow models,
/// `v_prediction` for v models). A class that cannot drive the model is an error.
pub fn scheduler_for(
    sampler: &str,
    file: Option<&Path>,
    prediction: ModelPrediction,
) -> Result<(String, Vec<(String, String)>)> {
    let (file_class, mut fields) = match file {
        Some(f) => scheduler_fields(f)?,
        None => (String::new(), Vec::new()),
    };
    let class = match sampler {
        "auto" if file_class.is_empty() => {
            fail!("sampler 'auto' needs a scheduler_config naming the class")
        }
        "auto" => file_class.clone(),
        name => match SAMPLERS.iter().find(|s| s.name == name) {
            Some(s) => {
                for &(k, v) in s.fields {
                    fields.retain(|(f, _)| f != k);
                    fields.push((k.into(), v.into()));
                }
                s.class.to_string()
            }
            None => fail!(
                "unknown sampler '{name}' (known: auto, {})",
                SAMPLERS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let has = |fields: &[(String, String)], k: &str| fields.iter().any(|(f, _)| f == k);
    let flow_matching = class.starts_with("FlowMatch") || class == "RFSolver";
    // A model that does not say what it predicts: its scheduler config does.
    let prediction = match prediction {
        ModelPrediction::Unknown if !file_class.is_empty() => {
            let field = |k: &str| {
                fields
                    .iter()
                    .find(|(f, _)| f == k)
                    .map(|(_, v)| v.trim().trim_matches('"').to_string())
            };
            let flow = file_class.starts_with("FlowMatch")
                || field("prediction_type").as_deref() == Some("flow_prediction")
                || field("use_flow_sigmas").as_deref() == Some("true");
            match field("prediction_type").as_deref() {
                _ if flow => ModelPrediction::Flow,
                Some("v_prediction") => ModelPrediction::V,
                _ if sampler != "auto" => ModelPrediction::Epsilon,
                _ => ModelPrediction::Unknown,
            }
        }
        p => p,
    };
    match prediction {
        ModelPrediction::Flow if class == "UniPCMultistepScheduler" => {
            let flag = fields.iter().find(|(k, _)| k == "use_flow_sigmas");
            if flag.is_some_and(|(_, v)| v.trim() == "false") {
                fail!("the model predicts a flow velocity: UniPC needs use_flow_sigmas = true");
            }
            if !has(&fields, "use_flow_sigmas") {
                fields.push(("use_flow_sigmas".into(), "true".into()));
            }
            if !has(&fields, "prediction_type") {
                fields.push(("prediction_type".into(), "\"flow_prediction\"".into()));
            }
        }
        ModelPrediction::Flow if !flow_matching => fail!(
            "the model predicts a flow velocity: use the flow_euler, flow_heun, rf_solver or unipc \
             sampler, not {class}"
        ),
        ModelPrediction::Epsilon | ModelPrediction::V if flow_matching => {
            fail!("the model predicts {prediction:?}, which the flow-matching sampler cannot use")
        }
        ModelPrediction::V if !has(&fields, "prediction_type") => {
            fields.push(("prediction_type".into(), "\"v_prediction\"".into()));
        }
        _ => {}
    }
    Ok((class, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_constants_become_strings() {
        let t = r#"{"a": -Infinity, "b": "NaN in \"text\"", "c": [Infinity, NaN], "d": 1e-3}"#;
        let v: serde_json::Value = serde_json::from_str(&quote_python_constants(t)).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "NaN in \"text\"");
        assert_eq!(v["c"][0], "Infinity");
        assert_eq!(v["d"], 1e-3);
    }
}
