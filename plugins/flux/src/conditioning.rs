//! `FluxTextEncode`: a prompt as FluxPipeline conditions on it: T5's hidden states (padded to
//! `max_sequence_length` with the pad token, no mask) as the tokens, and CLIP-L's pooled output
//! (77 tokens, padded) as `pooled_projections`. The encoders are any plugin's
//! `Model<TextEncoder>`.

use ditflow_plugin::prelude::*;

/// `FluxTextEncode`: CLIP-L + T5 conditioning for Flux.
#[derive(Default)]
pub struct FluxTextEncode;

impl Node for FluxTextEncode {
    fn schema() -> NodeSchema {
        NodeSchema::new("FluxTextEncode")
            .category("conditioning")
            .doc(
                "Encodes a prompt as FluxPipeline does: T5's last hidden state for the prompt \
                 padded to t5_tokens (no attention mask) as encoder_hidden_states, and CLIP-L's \
                 pooled output for the prompt padded to clip_tokens as pooled_projections. The \
                 text ids are the model's default (zeros).",
            )
            .input(
                Port::new("clip", "Model<TextEncoder>")
                    .doc("CLIP-L (CLIPTextModel), text_encoder/."),
            )
            .input(
                Port::new("t5", "Model<TextEncoder>")
                    .doc("T5-XXL (T5EncoderModel), text_encoder_2/."),
            )
            .input(Port::new("text", "String").default("").doc("The prompt."))
            .input(
                Port::new("text_t5", "String")
                    .default("")
                    .doc("A different prompt for T5 (FluxPipeline's prompt_2); empty uses text."),
            )
            .input(
                Port::new("clip_tokens", "Int")
                    .default(77i64)
                    .range(1.0, 77.0)
                    .doc("CLIP's padded length."),
            )
            .input(
                Port::new("t5_tokens", "Int")
                    .default(512i64)
                    .range(1.0, 4096.0)
                    .doc("T5's padded length (max_sequence_length: 512 for dev, 256 for schnell)."),
            )
            .output(
                Port::new("conditioning", "Conditioning").doc(
                    "encoder_hidden_states [1, t5_tokens, 4096] and pooled_projections [1, 768].",
                ),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let clip: Value = ctx.input("clip")?;
        let t5: Value = ctx.input("t5")?;
        let text: String = ctx.input("text")?;
        let text_t5: String = ctx.input("text_t5")?;
        let text_t5 = if text_t5.is_empty() { &text } else { &text_t5 };
        let n = |name: &str| -> Result<usize> { Ok(ctx.input::<i64>(name)?.max(1) as usize) };
        let pooled = clip
            .encode_padded(&text, n("clip_tokens")?)
            .map_err(|e| Error(format!("input 'clip': {e}")))?
            .take("pooler_output", "clip")?;
        let tokens = t5
            .encode_padded(text_t5, n("t5_tokens")?)
            .map_err(|e| Error(format!("input 't5': {e}")))?
            .take("last_hidden_state", "t5")?;
        ctx.set_output(
            "conditioning",
            Conditioning::tokens(tokens).with("pooled_projections", pooled),
        )
    }
}
