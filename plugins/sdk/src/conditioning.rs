//! Conditioning as a set of named tensors: what a denoiser's forward takes besides the latent,
//! e.g. `encoder_hidden_states` and `pooled_projections` for SD3 and Flux.
//!
//! On a graph link a Conditioning is either a bare Conditioning tensor, which stands for the set
//! `{encoder_hidden_states}` (what `TextEncode` gives), or a List of `[name, tensor]` pairs (what
//! the SD3 and Flux text stacks give). The host checks both shapes on `Conditioning` ports;
//! [`Conditioning`] reads and writes either, so nodes never see the encoding.

use crate::{Error, FromValue, IntoValue, Kind, Result, Tensor, Value};

/// The name a bare conditioning tensor stands for.
pub const TOKENS: &str = "encoder_hidden_states";

/// A dedicated inpainting model's mask, `[B, 1, h, w]` at the latent's size, 1 where it
/// repaints (`Sample` gives it to a model that reads it).
pub const INPAINT_MASK: &str = "inpaint_mask";

/// A dedicated inpainting model's mask at the image's size, `[B, 1, H, W]` of 0s and 1s (1
/// where it repaints), for models that fold pixels into channels (Flux Fill).
pub const INPAINT_MASK_PIXELS: &str = "inpaint_mask_pixels";

/// A dedicated inpainting model's encoded masked image, `[B, C, h, w]` like the latent: the
/// picture with the repainted region set to grey, through the VAE.
pub const MASKED_IMAGE_LATENTS: &str = "masked_image_latents";

/// Named conditioning tensors, in the order they were added; names are unique.
#[derive(Clone, Default)]
pub struct Conditioning {
    parts: Vec<(String, Tensor)>,
}

impl Conditioning {
    pub fn new() -> Conditioning {
        Conditioning::default()
    }

    /// The set `{encoder_hidden_states: tokens}`.
    pub fn tokens(tokens: Tensor) -> Conditioning {
        Conditioning::new().with(TOKENS, tokens)
    }

    /// Adds (or replaces) part `name`.
    pub fn with(mut self, name: &str, tensor: Tensor) -> Conditioning {
        self.insert(name, tensor);
        self
    }

    /// Adds (or replaces) part `name`.
    pub fn insert(&mut self, name: &str, tensor: Tensor) {
        match self.parts.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = tensor,
            None => self.parts.push((name.to_string(), tensor)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.parts.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The part names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.parts.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn parts(&self) -> &[(String, Tensor)] {
        &self.parts
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

impl std::fmt::Debug for Conditioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.parts.iter().map(|(n, t)| (n, t.shape())))
            .finish()
    }
}

fn bad(what: &str) -> Error {
    Error(format!(
        "a Conditioning is a conditioning tensor or a list of [name, tensor] pairs; {what}"
    ))
}

impl FromValue for Conditioning {
    fn from_value(value: &Value) -> Result<Self> {
        if value.kind() != Kind::List {
            return Ok(Conditioning::tokens(value.as_tensor()?));
        }
        let mut out = Conditioning::new();
        for (i, pair) in value.as_list()?.iter().enumerate() {
            let pair = pair
                .as_list()
                .map_err(|_| bad(&format!("item {i} is not a pair")))?;
            let [name, tensor] = pair.as_slice() else {
                return Err(bad(&format!("item {i} has {} entries", pair.len())));
            };
            let name = name
                .as_str()
                .map_err(|_| bad(&format!("item {i}'s name is not a String")))?;
            if out.get(name).is_some() {
                return Err(bad(&format!("'{name}' appears twice")));
            }
            let tensor = tensor
                .as_tensor()
                .map_err(|_| bad(&format!("item {i} ('{name}') holds no tensor")))?;
            out.parts.push((name.to_string(), tensor));
        }
        Ok(out)
    }
}

impl IntoValue for Conditioning {
    /// A lone `encoder_hidden_states` stays a bare tensor; anything else becomes the pair list.
    fn into_value(self) -> Value {
        let as_kind = |t: Tensor| t.with_kind(Kind::Conditioning).unwrap_or(t);
        if let [(name, _)] = self.parts.as_slice() {
            if name == TOKENS {
                let (_, t) = self.parts.into_iter().next().expect("one part");
                return as_kind(t).into_value();
            }
        }
        Value::list(
            self.parts
                .into_iter()
                .map(|(n, t)| Value::list(vec![Value::string(&n), as_kind(t).into_value()]))
                .collect(),
        )
    }
}
