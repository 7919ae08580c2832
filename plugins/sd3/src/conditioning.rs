//! `SD3TextEncode`: a prompt as StableDiffusion3Pipeline conditions on it. CLIP-L's and CLIP-G's
//! penultimate hidden states (77 tokens, padded with each tokenizer's pad token) are joined on
//! the feature axis and zero-padded to T5's width, then T5's tokens follow; the pooled
//! projection is CLIP-L's projected text embedding beside CLIP-G's. The encoders are any
//! plugin's `Model<TextEncoder>`.

use ditflow_plugin::ops::concat;
use ditflow_plugin::prelude::*;

/// SD3's three text encoders and their padded lengths.
pub struct TextStack<'a> {
    pub clip_l: &'a Value,
    pub clip_g: &'a Value,
    pub t5: Option<&'a Value>,
    pub clip_tokens: usize,
    pub t5_tokens: usize,
    /// The zero T5 tokens' width when there is no T5.
    pub t5_width: usize,
}

impl TextStack<'_> {
    /// The parts of one prompt: `encoder_hidden_states [1, clip_tokens + t5_tokens, W]` and
    /// `pooled_projections [1, P_L + P_G]`.
    pub fn encode(&self, text: &str, device: Device) -> Result<Conditioning> {
        let TextStack {
            clip_l,
            clip_g,
            t5,
            clip_tokens,
            t5_tokens,
            t5_width,
        } = *self;
        let clip = |enc: &Value, what: &str| -> Result<(Tensor, Tensor)> {
            let mut out = enc
                .encode_padded(text, clip_tokens)
                .map_err(|e| Error(format!("input '{what}': {e}")))?;
            Ok((
                out.take("penultimate_hidden_state", what)?,
                out.take("text_embeds", what).map_err(|e| {
                    Error(format!(
                        "{e}: SD3 needs CLIPTextModelWithProjection encoders"
                    ))
                })?,
            ))
        };
        let (hidden_l, pooled_l) = clip(clip_l, "clip_l")?;
        let (hidden_g, pooled_g) = clip(clip_g, "clip_g")?;
        let t5_hidden = match t5 {
            Some(enc) => enc
                .encode_padded(text, t5_tokens)
                .map_err(|e| Error(format!("input 't5': {e}")))?
                .take("last_hidden_state", "t5")?,
            None => Tensor::zeros(Kind::Tensor, DType::F32, &[1, t5_tokens, t5_width])?
                .to_device(device)?,
        };
        let width = t5_hidden.shape()[2];
        let clip_hidden = concat(&[&hidden_l, &hidden_g], 2)?;
        let clip_width = clip_hidden.shape()[2];
        if clip_width > width {
            bail!(
            "the CLIP states are {clip_width} wide together, wider than T5's {width}: SD3 pads \
             them to T5's width"
        );
        }
        let clip_hidden = if clip_width < width {
            let pad = Tensor::zeros(
                Kind::Tensor,
                DType::F32,
                &[1, clip_hidden.shape()[1], width - clip_width],
            )?
            .to_device(clip_hidden.device())?;
            concat(&[&clip_hidden.cast(DType::F32)?, &pad], 2)?
        } else {
            clip_hidden
        };
        let tokens = concat(
            &[
                &clip_hidden.cast(DType::F32)?,
                &t5_hidden
                    .to_device(clip_hidden.device())?
                    .cast(DType::F32)?,
            ],
            1,
        )?;
        let pooled = concat(&[&pooled_l, &pooled_g], 1)?;
        Ok(Conditioning::tokens(tokens).with("pooled_projections", pooled))
    }
}

/// `SD3TextEncode`: CLIP-L + CLIP-G + T5 conditioning for SD3 and SD3.5.
#[derive(Default)]
pub struct SD3TextEncode;

impl Node for SD3TextEncode {
    fn schema() -> NodeSchema {
        NodeSchema::new("SD3TextEncode")
            .category("conditioning")
            .doc(
                "Encodes a prompt as StableDiffusion3Pipeline does: CLIP-L's and CLIP-G's \
                 penultimate hidden states (padded to clip_tokens with each tokenizer's pad \
                 token) joined and zero-padded to T5's width, followed by T5's tokens (padded \
                 to t5_tokens, no mask), and the pooled projection of both CLIPs. Without a T5 \
                 encoder its tokens are zeros of t5_width, as the pipeline does.",
            )
            .input(Port::new("clip_l", "Model<TextEncoder>").doc("CLIP-L (CLIPTextModelWithProjection), text_encoder/."))
            .input(Port::new("clip_g", "Model<TextEncoder>").doc("CLIP-G (CLIPTextModelWithProjection), text_encoder_2/."))
            .input(Port::new("t5", "Model<TextEncoder>").optional().doc("T5-XXL (T5EncoderModel), text_encoder_3/; optional."))
            .input(Port::new("text", "String").default("").doc("The prompt; empty for the unconditional embedding."))
            .input(Port::new("clip_tokens", "Int").default(77i64).range(1.0, 77.0).doc("CLIP's padded length (the tokenizers' model_max_length)."))
            .input(Port::new("t5_tokens", "Int").default(256i64).range(1.0, 4096.0).doc("T5's padded length (the pipeline's max_sequence_length)."))
            .input(Port::new("t5_width", "Int").default(4096i64).range(1.0, 65536.0).doc("The width of the zero T5 tokens when no T5 is connected (the transformer's joint_attention_dim)."))
            .output(Port::new("conditioning", "Conditioning").doc("encoder_hidden_states [1, clip_tokens + t5_tokens, width] and pooled_projections [1, 768 + 1280]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let clip_l: Value = ctx.input("clip_l")?;
        let clip_g: Value = ctx.input("clip_g")?;
        let t5: Option<Value> = ctx.input_opt("t5")?;
        let text: String = ctx.input("text")?;
        let n = |name: &str| -> Result<usize> { Ok(ctx.input::<i64>(name)?.max(1) as usize) };
        let stack = TextStack {
            clip_l: &clip_l,
            clip_g: &clip_g,
            t5: t5.as_ref(),
            clip_tokens: n("clip_tokens")?,
            t5_tokens: n("t5_tokens")?,
            t5_width: n("t5_width")?,
        };
        let cond = stack.encode(&text, ctx.device())?;
        ctx.set_output("conditioning", cond)
    }
}
