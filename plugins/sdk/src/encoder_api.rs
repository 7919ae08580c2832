//! The text-encoder and autoencoder interfaces of the model protocol: a plugin's text encoder or
//! VAE as a Model value (`Model<TextEncoder>`, `Model<Autoencoder>`) that any plugin describes
//! and runs through the generic named forward ([`crate::model::forward_named`]).

use crate::abi::*;
use crate::model::{trampoline, Inputs};
use crate::value::{host, Object, Value};
use crate::{Context, Error, Result, Tensor};
use std::ffi::{c_char, c_void, CString};
use std::panic::catch_unwind;

/// What a text encoder says about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextEncoderInfo {
    /// Width of the hidden states.
    pub width: usize,
    /// Its longest sequence.
    pub max_tokens: usize,
    /// The token that pads a sequence to a fixed length, when the tokenizer has one.
    pub pad_token_id: Option<i64>,
}

/// What an autoencoder says about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoencoderInfo {
    pub latent_channels: usize,
    /// Image pixels per latent pixel.
    pub downscale: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

/// A text encoder any plugin can run.
pub trait TextEncoder: Object {
    fn describe(&self) -> TextEncoderInfo;
    /// Token ids `[1, n]` (i64) of `text`, at most `max_tokens`.
    fn tokenize(&self, text: &str, max_tokens: usize) -> Result<Tensor>;
    /// `input_ids` (and `attention_mask`) to `last_hidden_state` and what else the family has.
    fn forward(&self, inputs: &Inputs) -> Result<Vec<(String, Tensor)>>;
}

/// An autoencoder (VAE) any plugin can run.
pub trait Autoencoder: Object {
    fn describe(&self) -> AutoencoderInfo;
    /// `image` to `mean` and `logvar`; `latent` to `decoded`.
    fn forward(&self, inputs: &Inputs) -> Result<Vec<(String, Tensor)>>;
}

/// A model's named outputs, taken by name with an error naming what is missing.
pub struct NamedOutputs(pub Vec<(String, Tensor)>);

impl NamedOutputs {
    /// Output `name`, or an error naming `what` gave it not and what it gave.
    pub fn take(&mut self, name: &str, what: &str) -> Result<Tensor> {
        match self.0.iter().position(|(n, _)| n == name) {
            Some(i) => Ok(self.0.swap_remove(i).1),
            None => Err(Error(format!(
                "{what} gave no '{name}' (it gave {})",
                self.0
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// Named outputs in name order (a forward's result from a map).
pub fn sorted(outputs: std::collections::HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = outputs.into_iter().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The object behind the Model: the plugin's model first, so [`Value::as_object`] finds it.
#[repr(C)]
struct InterfaceBox<T, A, D> {
    inner: T,
    api: A,
    desc: D,
}

/// `[[name, tensor], ...]`, the generic forward's output.
fn named_list(out: Vec<(String, Tensor)>) -> Value {
    Value::list(
        out.into_iter()
            .map(|(n, t)| Value::list(vec![Value::string(&n), t.into_value()]))
            .collect(),
    )
}

unsafe extern "C" fn te_describe<T: TextEncoder>(o: *mut c_void) -> *const DfTextEncoderDesc {
    // SAFETY: the object made by `make_text_encoder::<T>`.
    let b = unsafe { &*(o as *const InterfaceBox<T, DfTextEncoderApi, DfTextEncoderDesc>) };
    &b.desc
}

unsafe extern "C" fn te_tokenize<T: TextEncoder>(
    o: *mut c_void,
    host_api: *const DfHostApi,
    text: *const c_char,
    len: usize,
    max_tokens: i64,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the object made by `make_text_encoder::<T>`, and `len` bytes of text.
        let b = unsafe { &*(o as *const InterfaceBox<T, DfTextEncoderApi, DfTextEncoderDesc>) };
        let bytes = if text.is_null() {
            &[][..]
        } else {
            // SAFETY: per the contract.
            unsafe { std::slice::from_raw_parts(text as *const u8, len) }
        };
        let text = std::str::from_utf8(bytes).map_err(|_| Error::new("the text is not UTF-8"))?;
        let ids = b.inner.tokenize(text, max_tokens.max(0) as usize)?;
        if out.is_null() {
            return Err(Error::new("no output slot"));
        }
        // SAFETY: checked for NULL.
        unsafe { *out = ids.into_value().into_raw() };
        Ok(())
    })
}

/// The generic forward of either interface, over the trait method `f`.
fn forward_into(
    host_api: *const DfHostApi,
    inputs: *const DfNamedValue,
    n: usize,
    out: *mut *mut DfValue,
    f: impl FnOnce(&Inputs) -> Result<Vec<(String, Tensor)>>,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: live named inputs for the call.
        let inputs = unsafe { Inputs::from_raw(inputs, n)? };
        let list = named_list(f(&inputs)?);
        if out.is_null() {
            return Err(Error::new("no output slot"));
        }
        // SAFETY: checked for NULL.
        unsafe { *out = list.into_raw() };
        Ok(())
    })
}

unsafe extern "C" fn te_forward<T: TextEncoder>(
    o: *mut c_void,
    host_api: *const DfHostApi,
    inputs: *const DfNamedValue,
    n: usize,
    out: *mut *mut DfValue,
) -> i32 {
    // SAFETY: the object made by `make_text_encoder::<T>`.
    let b = unsafe { &*(o as *const InterfaceBox<T, DfTextEncoderApi, DfTextEncoderDesc>) };
    forward_into(host_api, inputs, n, out, |i| b.inner.forward(i))
}

unsafe extern "C" fn ae_describe<T: Autoencoder>(o: *mut c_void) -> *const DfAutoencoderDesc {
    // SAFETY: the object made by `make_autoencoder::<T>`.
    let b = unsafe { &*(o as *const InterfaceBox<T, DfAutoencoderApi, DfAutoencoderDesc>) };
    &b.desc
}

unsafe extern "C" fn ae_forward<T: Autoencoder>(
    o: *mut c_void,
    host_api: *const DfHostApi,
    inputs: *const DfNamedValue,
    n: usize,
    out: *mut *mut DfValue,
) -> i32 {
    // SAFETY: the object made by `make_autoencoder::<T>`.
    let b = unsafe { &*(o as *const InterfaceBox<T, DfAutoencoderApi, DfAutoencoderDesc>) };
    forward_into(host_api, inputs, n, out, |i| b.inner.forward(i))
}

unsafe extern "C" fn drop_box<B>(o: *mut c_void) {
    if !o.is_null() {
        let _ = catch_unwind(|| {
            // SAFETY: made by `Box::into_raw` in `make_interface::<B>`.
            drop(unsafe { Box::from_raw(o as *mut B) })
        });
    }
}

impl Context {
    /// Hands `b` (whose `api` field is the table) to the host as a Model with `interface`.
    fn make_interface<B: 'static>(
        &self,
        interface: u32,
        tag: &str,
        b: Box<B>,
        api: impl FnOnce(&B) -> *const c_void,
    ) -> Result<Value> {
        let tag = CString::new(tag).map_err(|_| Error::new("a tag with a NUL byte"))?;
        let api = api(&b);
        let raw = Box::into_raw(b) as *mut c_void;
        // SAFETY: the host owns `raw` from here on and calls `drop_box::<B>` once; `api`
        // points into it.
        let v = unsafe {
            (host().value_model)(
                self.raw(),
                interface,
                api,
                tag.as_ptr(),
                raw,
                Some(drop_box::<B>),
            )
        };
        Value::from_owned(v).ok_or_else(|| Error(crate::ops::last_error()))
    }

    /// Wraps a text encoder in a `Model<TextEncoder>` value.
    pub fn make_text_encoder<T: TextEncoder>(&self, model: T) -> Result<Value> {
        let info = model.describe();
        let b = Box::new(InterfaceBox {
            inner: model,
            api: DfTextEncoderApi {
                size: std::mem::size_of::<DfTextEncoderApi>() as u32,
                version: 1,
                describe: Some(te_describe::<T>),
                tokenize: Some(te_tokenize::<T>),
                forward: Some(te_forward::<T>),
                reserved: [std::ptr::null(); 4],
            },
            desc: DfTextEncoderDesc {
                size: std::mem::size_of::<DfTextEncoderDesc>() as u32,
                _pad: 0,
                width: info.width as i64,
                max_tokens: info.max_tokens as i64,
                reserved: [std::ptr::null(); 4],
                pad_token_id: info.pad_token_id.unwrap_or(-1),
            },
        });
        self.make_interface(DF_INTERFACE_TEXT_ENCODER, T::TAG, b, |b| {
            &b.api as *const DfTextEncoderApi as *const c_void
        })
    }

    /// Wraps an autoencoder in a `Model<Autoencoder>` value.
    pub fn make_autoencoder<T: Autoencoder>(&self, model: T) -> Result<Value> {
        let info = model.describe();
        let b = Box::new(InterfaceBox {
            inner: model,
            api: DfAutoencoderApi {
                size: std::mem::size_of::<DfAutoencoderApi>() as u32,
                version: 1,
                describe: Some(ae_describe::<T>),
                forward: Some(ae_forward::<T>),
                reserved: [std::ptr::null(); 4],
            },
            desc: DfAutoencoderDesc {
                size: std::mem::size_of::<DfAutoencoderDesc>() as u32,
                _pad: 0,
                latent_channels: info.latent_channels as i64,
                downscale: info.downscale as i64,
                scaling_factor: info.scaling_factor,
                shift_factor: info.shift_factor,
                reserved: [std::ptr::null(); 4],
            },
        });
        self.make_interface(DF_INTERFACE_AUTOENCODER, T::TAG, b, |b| {
            &b.api as *const DfAutoencoderApi as *const c_void
        })
    }
}

/// The table and object of `v`'s `interface`, or an error naming what `v` is instead.
fn interface(v: &Value, interface: u32, what: &str) -> Result<(*const c_void, *mut c_void)> {
    let mut object: *mut c_void = std::ptr::null_mut();
    // SAFETY: a live handle and an out-slot.
    let api = unsafe { (host().model_interface)(v.as_ptr(), interface, &mut object) };
    if api.is_null() {
        return Err(Error(format!(
            "expected {what}, got {}",
            crate::model::describe_model(v)
        )));
    }
    Ok((api, object))
}

impl Value {
    /// This Model's autoencoder description, from whichever plugin made it.
    pub fn autoencoder_info(&self) -> Result<AutoencoderInfo> {
        let (api, object) = interface(self, DF_INTERFACE_AUTOENCODER, "an autoencoder (VAE)")?;
        // SAFETY: the host checked the table's size for the interface.
        let api = unsafe { &*(api as *const DfAutoencoderApi) };
        let describe = api
            .describe
            .ok_or_else(|| Error::new("the autoencoder does not describe itself"))?;
        // SAFETY: the plugin's function on its own object.
        let d = unsafe { describe(object).as_ref() }
            .ok_or_else(|| Error::new("the autoencoder gave no description"))?;
        Ok(AutoencoderInfo {
            latent_channels: d.latent_channels.max(0) as usize,
            downscale: d.downscale.max(0) as usize,
            scaling_factor: d.scaling_factor,
            shift_factor: d.shift_factor,
        })
    }

    /// The latent distribution's mean `[1, C, H/f, W/f]` (unscaled) of an image `[H, W, 3]`
    /// (f32 in `[0, 1]`, or u8) from this autoencoder, whichever plugin made it; the sides must
    /// be multiples of its downscale factor.
    pub fn encode_image_mean(&self, image: &Tensor) -> Result<Tensor> {
        let vae = self.autoencoder_info()?;
        let s = image.shape().to_vec();
        if s.len() != 3
            || s[2] != 3
            || !s[0].is_multiple_of(vae.downscale)
            || !s[1].is_multiple_of(vae.downscale)
        {
            return Err(Error(format!(
                "the image must be [height, width, 3] with sides multiples of {}, got {s:?}",
                vae.downscale
            )));
        }
        let x = image_to_signed_nchw(image)?;
        NamedOutputs(crate::model::forward_named(self, &[("image", &x)])?).take("mean", "the VAE")
    }

    /// This Model's text-encoder description, from whichever plugin made it.
    pub fn text_encoder_info(&self) -> Result<TextEncoderInfo> {
        let (api, object) = interface(self, DF_INTERFACE_TEXT_ENCODER, "a text encoder")?;
        // SAFETY: the host checked the table's size for the interface.
        let api = unsafe { &*(api as *const DfTextEncoderApi) };
        let describe = api
            .describe
            .ok_or_else(|| Error::new("the text encoder does not describe itself"))?;
        // SAFETY: the plugin's function on its own object.
        let d = unsafe { describe(object).as_ref() }
            .ok_or_else(|| Error::new("the text encoder gave no description"))?;
        let has_pad = d.size as usize >= std::mem::size_of::<DfTextEncoderDesc>();
        Ok(TextEncoderInfo {
            width: d.width.max(0) as usize,
            max_tokens: d.max_tokens.max(0) as usize,
            pad_token_id: Some(d.pad_token_id).filter(|&p| has_pad && p >= 0),
        })
    }

    /// Token ids `[1, max_tokens]` of `text` padded with the tokenizer's pad token, as
    /// transformers' `padding="max_length", truncation=True` gives them; an error names the
    /// encoder when it knows no pad token.
    pub fn tokenize_padded(&self, text: &str, max_tokens: usize) -> Result<Tensor> {
        let ids = self.tokenize(text, max_tokens)?;
        let n = ids.shape().get(1).copied().unwrap_or(0);
        if n >= max_tokens {
            return Ok(ids);
        }
        let pad = self.text_encoder_info()?.pad_token_id.ok_or_else(|| {
            Error(format!(
                "{} has no pad token to pad the prompt to {max_tokens} tokens \
                 (its tokenizer_config.json names none)",
                crate::model::describe_model(self)
            ))
        })?;
        let mut all: Vec<i64> = ids
            .bytes()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        all.resize(max_tokens, pad);
        let bytes: Vec<u8> = all.iter().flat_map(|i| i.to_le_bytes()).collect();
        Tensor::from_bytes(
            crate::Kind::Tensor,
            crate::DType::I64,
            &[1, max_tokens],
            &bytes,
        )
    }

    /// This text encoder's named outputs for `text` padded to `pad_to` tokens (see
    /// [`Value::tokenize_padded`]), run without an attention mask, as the SD3 and Flux
    /// pipelines run their encoders.
    pub fn encode_padded(&self, text: &str, pad_to: usize) -> Result<NamedOutputs> {
        let ids = self.tokenize_padded(text, pad_to)?;
        Ok(NamedOutputs(crate::model::forward_named(
            self,
            &[("input_ids", &ids)],
        )?))
    }

    /// Token ids `[1, n]` of `text` from this text encoder, whichever plugin made it.
    pub fn tokenize(&self, text: &str, max_tokens: usize) -> Result<Tensor> {
        let (api, object) = interface(self, DF_INTERFACE_TEXT_ENCODER, "a text encoder")?;
        // SAFETY: the host checked the table's size for the interface.
        let api = unsafe { &*(api as *const DfTextEncoderApi) };
        let tokenize = api
            .tokenize
            .ok_or_else(|| Error::new("the text encoder does not tokenize"))?;
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: the plugin's function on its own object with live arguments.
        let rc = unsafe {
            tokenize(
                object,
                host(),
                text.as_ptr() as *const c_char,
                text.len(),
                max_tokens as i64,
                &mut out,
            )
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => v.as_tensor(),
            _ => Err(Error(crate::ops::last_error())),
        }
    }
}

/// An image `[H, W, 3]` (f32 in `[0, 1]`, or u8) as the diffusers image processors give it to a
/// model: `[1, 3, H, W]` in `[-1, 1]`.
pub fn image_to_signed_nchw(image: &Tensor) -> Result<Tensor> {
    use crate::{DType, Kind};
    let s = image.shape().to_vec();
    if s.len() != 3 || s[2] != 3 {
        return Err(Error(format!(
            "the image must be [height, width, 3], got {s:?}"
        )));
    }
    // u8 images are 0..=255; f32 images 0..=1.
    let unit = if image.dtype() == DType::U8 {
        1.0 / 255.0
    } else {
        1.0
    };
    image
        .cast(DType::F32)?
        .affine(unit, 0.0)?
        .permute(&[2, 0, 1])?
        .reshape(&[1, 3, s[0] as i64, s[1] as i64])?
        .affine(2.0, -1.0)?
        .with_kind(Kind::Tensor)
}
