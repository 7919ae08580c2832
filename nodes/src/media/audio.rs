//! Audio file nodes: `LoadAudio` reads WAV (through `hound`; other formats through ffmpeg when it
//! is installed), `SaveAudio` writes WAV, `AudioRate` sets a bare tensor's sample rate, and
//! `JoinAudio` plays one sound after another.
//! Samples are f32 `[channels, samples]`, full scale at ±1; integer WAVs are scaled by
//! 2^(bits-1).

use super::ffmpeg;
use ditflow_plugin::files::{absolute, file_fingerprint, input_path, io_error, output_path};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Audio;
use std::path::Path;

/// Decoded audio: `[channels][samples]` planar f32 and the rate in Hz.
#[derive(Debug, Clone, PartialEq)]
pub struct Pcm {
    pub channels: usize,
    pub rate: u32,
    /// Planar: channel c's samples at `c * len .. (c + 1) * len`.
    pub data: Vec<f32>,
}

impl Pcm {
    pub fn len(&self) -> usize {
        self.data.len() / self.channels.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Reads a WAV stream (8 to 32-bit integers, or 32-bit floats).
pub fn read_wav<R: std::io::Read>(reader: R) -> Result<Pcm> {
    let bad = |e: hound::Error| Error(format!("not a readable WAV file: {e}"));
    let mut wav = hound::WavReader::new(reader).map_err(bad)?;
    let spec = wav.spec();
    let channels = spec.channels as usize;
    if channels == 0 {
        bail!("the WAV file has no channels");
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => wav
            .samples::<f32>()
            .collect::<std::result::Result<_, _>>()
            .map_err(bad)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            wav.samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<std::result::Result<_, _>>()
                .map_err(bad)?
        }
    };
    let len = interleaved.len() / channels;
    let mut data = vec![0f32; len * channels];
    for (i, frame) in interleaved.chunks_exact(channels).enumerate() {
        for (c, v) in frame.iter().enumerate() {
            data[c * len + i] = *v;
        }
    }
    Ok(Pcm {
        channels,
        rate: spec.sample_rate,
        data,
    })
}

/// How samples are stored in a WAV file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WavFormat {
    /// 32-bit float, exact.
    F32,
    /// 16-bit integers: scaled by 2^15, rounded and clamped (so +1 becomes 32767/32768).
    Pcm16,
}

/// Writes planar samples as a WAV stream.
pub fn write_wav<W: std::io::Write + std::io::Seek>(
    writer: W,
    pcm: &Pcm,
    format: WavFormat,
) -> Result<()> {
    let fail = |e: hound::Error| Error(format!("WAV encoding failed: {e}"));
    let Ok(channels) = u16::try_from(pcm.channels) else {
        bail!("{} channels are too many for WAV", pcm.channels);
    };
    let spec = hound::WavSpec {
        channels,
        sample_rate: pcm.rate,
        bits_per_sample: if format == WavFormat::F32 { 32 } else { 16 },
        sample_format: if format == WavFormat::F32 {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let mut w = hound::WavWriter::new(writer, spec).map_err(fail)?;
    let len = pcm.len();
    for i in 0..len {
        for c in 0..pcm.channels {
            let v = pcm.data[c * len + i];
            match format {
                WavFormat::F32 => w.write_sample(v).map_err(fail)?,
                WavFormat::Pcm16 => {
                    // The reader's scale (2^15), clamped to the i16 range.
                    let v = if v.is_nan() { 0.0 } else { v };
                    let s = (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                    w.write_sample(s).map_err(fail)?
                }
            }
        }
    }
    w.finalize().map_err(fail)
}

/// An Audio value as planar PCM at an integer rate.
pub fn pcm_of(audio: &Audio, who: &str) -> Result<Pcm> {
    let rate = audio.rate(who)?;
    if rate.fract() != 0.0 || rate > u32::MAX as f64 {
        bail!("{who}: WAV needs a whole sample rate in Hz, not {rate}");
    }
    let samples = audio.samples.cast(DType::F32)?.to_device(Device::Cpu)?;
    Ok(Pcm {
        channels: audio.channels(),
        rate: rate as u32,
        data: samples.to_f32_vec()?,
    })
}

/// A WAV file as an Audio value; other formats go through ffmpeg.
pub fn load_audio(path: &Path, who: &str) -> Result<Audio> {
    let is_wav = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    let pcm = if is_wav {
        let file = std::fs::File::open(path).map_err(|e| io_error("cannot read", path, &e))?;
        read_wav(std::io::BufReader::new(file))
    } else {
        let wav = ffmpeg::decode_audio_to_wav(path, who)?;
        let file =
            std::fs::File::open(wav.path()).map_err(|e| io_error("cannot read", wav.path(), &e))?;
        read_wav(std::io::BufReader::new(file))
    }
    .map_err(|e| Error(format!("cannot read {}: {e}", path.display())))?;
    let samples = Tensor::from_f32(Kind::Audio, &[pcm.channels, pcm.len()], &pcm.data)?;
    Audio::new(samples, pcm.rate as f64)
}

/// `LoadAudio`: an audio file.
#[derive(Default)]
pub struct LoadAudio;

impl Node for LoadAudio {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadAudio")
            .category("audio")
            .doc(
                "Reads a WAV file (8 to 32-bit integer or 32-bit float samples, any channel \
                 count) as f32 samples in [-1, 1] with its sample rate. Other formats (MP3, \
                 FLAC, the audio of a video...) are read through ffmpeg when it is installed. \
                 Cached until the file's size or modification time changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The audio file; a relative path is taken from the graph's folder."),
            )
            .output(
                Port::new("audio", "Audio")
                    .doc("f32 samples [channels, samples] with the file's sample rate."),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let path = input_path(ctx, "path")?;
        let audio = load_audio(&path, "LoadAudio")?;
        ctx.set_output("audio", audio)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        file_fingerprint("cannot read", &input_path(ctx, "path")?).map(Some)
    }
}

/// `SaveAudio`: audio to a WAV file.
#[derive(Default)]
pub struct SaveAudio;

impl Node for SaveAudio {
    fn schema() -> NodeSchema {
        NodeSchema::new("SaveAudio")
            .category("audio")
            .doc(
                "Writes audio as a WAV file at its sample rate: 32-bit float samples (exact) or \
                 16-bit integers (scaled by 32768, rounded, clamped to their range). An existing \
                 file is replaced.",
            )
            .input(Port::new("audio", "Audio").doc("Samples [channels, samples] with a rate."))
            .input(
                Port::new("path", "String")
                    .default("audio.wav")
                    .doc("Where to write; a relative path goes under the run's output folder."),
            )
            .input(
                Port::new("format", "String")
                    .default("f32")
                    .doc("f32 (32-bit float) or pcm16 (16-bit integers)."),
            )
            .output(Port::new("path", "String").doc("The absolute path of the file written."))
            .side_effects()
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let audio: Audio = ctx.input("audio")?;
        let format = match ctx.input::<String>("format")?.as_str() {
            "f32" => WavFormat::F32,
            "pcm16" => WavFormat::Pcm16,
            other => bail!("format '{other}' is not one of f32, pcm16"),
        };
        let pcm = pcm_of(&audio, "SaveAudio")?;
        let mut bytes = std::io::Cursor::new(Vec::new());
        write_wav(&mut bytes, &pcm, format)?;
        let path = output_path(ctx, "path")?;
        std::fs::write(&path, bytes.into_inner())
            .map_err(|e| io_error("cannot write", &path, &e))?;
        ctx.set_output("path", absolute(&path))
    }
}

/// `AudioRate`: samples with a sample rate.
#[derive(Default)]
pub struct AudioRate;

impl Node for AudioRate {
    fn schema() -> NodeSchema {
        NodeSchema::new("AudioRate")
            .category("audio")
            .doc(
                "Gives audio samples a sample rate (replacing any they had): for a tensor a \
                 model's forward made, say.",
            )
            .input(Port::new("audio", "Audio").doc("Samples [channels, samples]."))
            .input(
                Port::new("sample_rate", "Float")
                    .range(1.0, 1e7)
                    .doc("The rate in Hz."),
            )
            .output(Port::new("audio", "Audio").doc("The samples at that rate."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let audio: Audio = ctx.input("audio")?;
        let rate: f64 = ctx.input("sample_rate")?;
        ctx.set_output("audio", Audio::new(audio.samples, rate)?)
    }
}

/// `JoinAudio`: one sound after another.
#[derive(Default)]
pub struct JoinAudio;

impl Node for JoinAudio {
    fn schema() -> NodeSchema {
        NodeSchema::new("JoinAudio")
            .category("audio")
            .doc(
                "Plays the second sound after the first, dropping the second's first \
                 `overlap` seconds (the part it shares with the first, as JoinVideos drops a \
                 scene extension's repeated frames). Channels and sample rates must match.",
            )
            .input(Port::new("first", "Audio").doc("The first sound."))
            .input(Port::new("second", "Audio").doc("The sound that follows."))
            .input(
                Port::new("overlap", "Float")
                    .default(0.0)
                    .range(0.0, 1e6)
                    .doc("Seconds of the second to drop."),
            )
            .output(Port::new("audio", "Audio").doc("Both, one after the other."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let a: Audio = ctx.input("first")?;
        let b: Audio = ctx.input("second")?;
        let rate = a.rate("JoinAudio")?;
        if (b.rate("JoinAudio")? - rate).abs() > 1e-9 || a.channels() != b.channels() {
            bail!(
                "the sounds are {} channels at {rate} Hz and {} at {} Hz: join sounds of one \
                 form",
                a.channels(),
                b.channels(),
                b.rate("JoinAudio")?
            );
        }
        let overlap: f64 = ctx.input("overlap")?;
        let drop = (overlap * rate).round() as usize;
        if drop >= b.len() {
            bail!("overlap {overlap} s drops all of the second sound");
        }
        let kept = b.samples.split(1, &[drop, b.len() - drop])?.remove(1);
        let joined = ditflow_plugin::ops::concat(
            &[&a.samples.cast(DType::F32)?, &kept.cast(DType::F32)?],
            1,
        )?;
        ctx.set_output("audio", Audio::new(joined.with_kind(Kind::Audio)?, rate)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_bytes(spec: hound::WavSpec, samples: &[i32]) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
        for s in samples {
            w.write_sample(*s).unwrap();
        }
        w.finalize().unwrap();
        out.into_inner()
    }

    #[test]
    fn integer_wavs_scale_to_unit_and_deinterleave() {
        // Stereo 16-bit: frames (0, 16384), (-32768, 32767) -> planar [[0, -1], [0.5, 0.99997]].
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let pcm = read_wav(std::io::Cursor::new(wav_bytes(
            spec,
            &[0, 16384, -32768, 32767],
        )))
        .unwrap();
        assert_eq!((pcm.channels, pcm.rate, pcm.len()), (2, 8000, 2));
        assert_eq!(pcm.data[..3], [0.0, -1.0, 0.5]);
        assert!((pcm.data[3] - 32767.0 / 32768.0).abs() < 1e-7);
    }

    #[test]
    fn f32_wavs_round_trip_exactly_and_pcm16_rounds() {
        let pcm = Pcm {
            channels: 2,
            rate: 44100,
            data: vec![0.0, 0.25, -0.75, 1.5, 0.1, -0.3],
        };
        let mut buf = std::io::Cursor::new(Vec::new());
        write_wav(&mut buf, &pcm, WavFormat::F32).unwrap();
        let back = read_wav(std::io::Cursor::new(buf.into_inner())).unwrap();
        assert_eq!(back, pcm);
        let mut buf = std::io::Cursor::new(Vec::new());
        write_wav(&mut buf, &pcm, WavFormat::Pcm16).unwrap();
        let back = read_wav(std::io::Cursor::new(buf.into_inner())).unwrap();
        // 1.5 clamps to 32767/32768; the rest within half a step.
        for (g, w) in back.data.iter().zip(&pcm.data) {
            assert!((g - w.clamp(-1.0, 32767.0 / 32768.0)).abs() <= 0.5 / 32768.0 + 1e-6);
        }
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = read_wav(std::io::Cursor::new(b"RIFF1234WAVEjunk".to_vec())).unwrap_err();
        assert!(e.0.contains("not a readable WAV"), "{}", e.0);
    }
}
