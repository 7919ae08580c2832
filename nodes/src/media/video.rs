//! Video file nodes. `SaveVideo` writes animated PNG (APNG) or a PNG sequence itself, and MP4 or
//! WebM with the audio muxed in through ffmpeg; `LoadVideo` reads those back (MP4 and the rest
//! through ffmpeg, with their sound); `VideoFrame` picks a frame as an image, `VideoRate` sets a
//! frame rate, `JoinVideos` plays one after another, and `PixelsToVideo` reads a pixel-space video latent (a model trained on the
//! frames themselves) as a video. Frames are f32 `[frames, height, width, 3]` in [0, 1].

use super::audio::{load_audio, pcm_of, write_wav, WavFormat};
use super::ffmpeg;
use crate::image::{decode_png, encode_png, unit_to_u8, upscale_nearest};
use ditflow_plugin::files::{absolute, input_path, io_error, model_fingerprint, output_path};
use ditflow_plugin::media::video_layout;
use ditflow_plugin::prelude::*;
use ditflow_plugin::{Audio, Video};
use std::path::{Path, PathBuf};

/// The most frames a video may have when read (a guard against huge allocations).
const MAX_FRAMES: usize = 100_000;

/// A frame delay of `1/fps` seconds as APNG's `u16` fraction, as close as it allows.
pub fn frame_delay(fps: f64) -> (u16, u16) {
    // Exact for whole rates and for NTSC's 30000/1001-style ones.
    for den_scale in [1.0, 1001.0] {
        let den = fps * den_scale;
        if (den - den.round()).abs() < 1e-6 && den.round() <= u16::MAX as f64 && den >= 1.0 {
            return (den_scale as u16, den.round() as u16);
        }
    }
    let den = (fps * 100.0).round().clamp(1.0, u16::MAX as f64);
    (100, den as u16)
}

/// f32 frames `[T, H, W, 3]` as 8-bit RGB bytes, each pixel a `scale × scale` block.
fn frames_u8(video: &Video, scale: usize) -> Result<(Vec<u8>, (usize, usize, usize))> {
    let (t, h, w) = video.layout()?;
    let frames = video.frames.cast(DType::F32)?.to_device(Device::Cpu)?;
    let rgb: Vec<u8> = frames.as_f32()?.iter().copied().map(unit_to_u8).collect();
    if scale <= 1 {
        return Ok((rgb, (t, h, w)));
    }
    let out = rgb
        .chunks_exact(h * w * 3)
        .flat_map(|f| upscale_nearest(f, w, h, 3, scale))
        .collect();
    Ok((out, (t, h * scale, w * scale)))
}

/// Encodes 8-bit RGB frames as an APNG that loops forever.
pub fn encode_apng(rgb: &[u8], (t, h, w): (usize, usize, usize), fps: f64) -> Result<Vec<u8>> {
    let fail = |e: png::EncodingError| Error(format!("APNG encoding failed: {e}"));
    let (Ok(wu), Ok(hu), Ok(tu)) = (u32::try_from(w), u32::try_from(h), u32::try_from(t)) else {
        bail!("a {t}-frame {w}×{h} video is too large for APNG");
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, wu, hu);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_animated(tu, 0).map_err(fail)?;
    let (num, den) = frame_delay(fps);
    encoder.set_frame_delay(num, den).map_err(fail)?;
    let mut writer = encoder.write_header().map_err(fail)?;
    for frame in rgb.chunks_exact(h * w * 3) {
        writer.write_image_data(frame).map_err(fail)?;
    }
    writer.finish().map_err(fail)?;
    Ok(out)
}

/// Decoded frames: f32 RGB in [0, 1], `(frames, height, width)`, and the frame rate if known.
pub type DecodedFrames = (Vec<f32>, (usize, usize, usize), Option<f64>);

/// Decodes every frame of an APNG (or the one frame of a plain PNG) as f32 RGB in [0, 1], with
/// its frame rate from the first frame's delay (`None` for a still image).
pub fn decode_apng(bytes: &[u8]) -> Result<DecodedFrames> {
    let bad = |e: png::DecodingError| Error(format!("not a readable PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(bad)?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    let frames = reader
        .info()
        .animation_control
        .map_or(1, |a| a.num_frames as usize);
    if frames == 0 || frames > MAX_FRAMES {
        bail!("an APNG of {frames} frames");
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::new("the PNG is too large to decode"))?;
    let mut buf = vec![0u8; size];
    let mut data = Vec::with_capacity(frames * h * w * 3);
    let mut fps = None;
    for i in 0..frames {
        let info = reader.next_frame(&mut buf).map_err(bad)?;
        if let Some(fc) = reader.info().frame_control {
            if fc.width as usize != w || fc.height as usize != h {
                bail!("APNG frame {i} covers part of the picture; only full frames are read");
            }
            if i == 0 && fc.delay_num > 0 {
                let den = if fc.delay_den == 0 { 100 } else { fc.delay_den };
                fps = Some(den as f64 / fc.delay_num as f64);
            }
        }
        let samples = info.color_type.samples();
        if info.bit_depth != png::BitDepth::Eight || !matches!(samples, 3 | 4) {
            bail!(
                "APNG frames must be 8-bit RGB or RGBA, got {:?} {:?}",
                info.color_type,
                info.bit_depth
            );
        }
        for row in buf.chunks(info.line_size).take(h) {
            for px in row[..w * samples].chunks_exact(samples) {
                data.extend(px[..3].iter().map(|&v| v as f32 / 255.0));
            }
        }
    }
    Ok((data, (frames, h, w), fps))
}

/// The PNG files of a folder, sorted by name.
fn png_sequence(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("cannot read", dir, &e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no PNG files", dir.display());
    }
    Ok(files)
}

/// Reads a folder of PNG frames, all of one size.
fn read_sequence(dir: &Path) -> Result<(Vec<f32>, (usize, usize, usize))> {
    let files = png_sequence(dir)?;
    let mut data = Vec::new();
    let mut size = None;
    for f in &files {
        let file = std::fs::File::open(f).map_err(|e| io_error("cannot read", f, &e))?;
        let img = decode_png(std::io::BufReader::new(file))
            .map_err(|e| Error(format!("cannot read {}: {e}", f.display())))?;
        if *size.get_or_insert((img.height, img.width)) != (img.height, img.width) {
            bail!(
                "{} is {}x{}, but the first frame is {}x{}: a sequence's frames must have one size",
                f.display(),
                img.width,
                img.height,
                size.unwrap().1,
                size.unwrap().0
            );
        }
        for px in img.data.chunks_exact(img.channels) {
            match img.channels {
                1 | 2 => data.extend([px[0]; 3]),
                _ => data.extend_from_slice(&px[..3]),
            }
        }
    }
    let (h, w) = size.expect("at least one frame");
    Ok((data, (files.len(), h, w)))
}

/// How a path is written or read, from its form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// `.png` or `.apng`.
    Apng,
    /// A folder (a path ending in `/`, or one without an extension): `frame_00000.png`...
    PngSequence,
    /// Anything else: through ffmpeg.
    Ffmpeg,
}

pub fn container_of(path: &str) -> Container {
    if path.ends_with('/') || path.ends_with(std::path::MAIN_SEPARATOR) {
        return Container::PngSequence;
    }
    match Path::new(path).extension().and_then(|e| e.to_str()) {
        None => Container::PngSequence,
        Some(e) if e.eq_ignore_ascii_case("png") || e.eq_ignore_ascii_case("apng") => {
            Container::Apng
        }
        Some(_) => Container::Ffmpeg,
    }
}

/// `SaveVideo`: frames (and sound) to a file.
#[derive(Default)]
pub struct SaveVideo;

impl Node for SaveVideo {
    fn schema() -> NodeSchema {
        NodeSchema::new("SaveVideo")
            .category("video")
            .doc(
                "Writes a video at its frame rate. The path's form picks the container: .png \
                 or .apng an animated PNG (looping; a given audio is written beside it as a WAV \
                 of the same name), a folder (ending in / or without an extension) a PNG per \
                 frame, and .mp4 (H.264 + AAC), .webm (VP9 + Opus) or any other extension \
                 through ffmpeg, with the audio muxed in (cut to the shorter of the two). ffmpeg \
                 must be on PATH for those; the message says so when it is not.",
            )
            .input(
                Port::new("video", "Video")
                    .doc("Frames [frames, height, width, 3] in [0, 1] with a frame rate."),
            )
            .input(
                Port::new("audio", "Audio")
                    .optional()
                    .doc("The sound, when there is one."),
            )
            .input(
                Port::new("path", "String")
                    .default("video.png")
                    .doc("Where to write; a relative path goes under the run's output folder."),
            )
            .input(
                Port::new("scale", "Int")
                    .default(1i64)
                    .range(1.0, 64.0)
                    .doc("Each pixel becomes a scale × scale block (nearest neighbour)."),
            )
            .output(
                Port::new("path", "String")
                    .doc("The absolute path of the file (or folder) written."),
            )
            .side_effects()
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let video: Video = ctx.input("video")?;
        let audio: Option<Audio> = ctx.input_opt("audio")?;
        let requested: String = ctx.input("path")?;
        let fps = video.rate("SaveVideo")?;
        let scale = ctx.input::<i64>("scale")?.clamp(1, 64) as usize;
        let (rgb, layout) = frames_u8(&video, scale)?;
        let pcm = audio.as_ref().map(|a| pcm_of(a, "SaveVideo")).transpose()?;
        let wav_bytes = |pcm: &super::audio::Pcm| -> Result<Vec<u8>> {
            let mut bytes = std::io::Cursor::new(Vec::new());
            write_wav(&mut bytes, pcm, WavFormat::F32)?;
            Ok(bytes.into_inner())
        };
        let container = container_of(&requested);
        if container == Container::Ffmpeg {
            // Checked before anything is written.
            ffmpeg::program("ffmpeg", &format!("SaveVideo to {requested}"))?;
        }
        let path = output_path(ctx, "path")?;
        let write = |p: &Path, bytes: &[u8]| {
            std::fs::write(p, bytes).map_err(|e| io_error("cannot write", p, &e))
        };
        match container {
            Container::Apng => {
                write(&path, &encode_apng(&rgb, layout, fps)?)?;
                if let Some(pcm) = &pcm {
                    let wav = path.with_extension("wav");
                    write(&wav, &wav_bytes(pcm)?)?;
                    ctx.log(&format!(
                        "APNG holds no sound: the audio is in {}",
                        wav.display()
                    ));
                }
            }
            Container::PngSequence => {
                std::fs::create_dir_all(&path).map_err(|e| io_error("cannot create", &path, &e))?;
                let (t, h, w) = layout;
                for (i, frame) in rgb.chunks_exact(h * w * 3).enumerate() {
                    ctx.check_cancelled()?;
                    write(
                        &path.join(format!("frame_{i:05}.png")),
                        &encode_png(w, h, 3, frame)?,
                    )?;
                    ctx.progress(i as u64 + 1, t as u64);
                }
                if let Some(pcm) = &pcm {
                    write(&path.join("audio.wav"), &wav_bytes(pcm)?)?;
                }
            }
            Container::Ffmpeg => {
                let wav = match &pcm {
                    Some(pcm) => {
                        let tmp = ffmpeg::TempPath::new("wav");
                        write(tmp.path(), &wav_bytes(pcm)?)?;
                        Some(tmp)
                    }
                    None => None,
                };
                ffmpeg::encode(
                    &rgb,
                    layout,
                    fps,
                    wav.as_ref()
                        .zip(pcm.as_ref())
                        .map(|(t, p)| (t.path(), p.channels)),
                    &path,
                    "SaveVideo",
                )?;
            }
        }
        ctx.set_output("path", absolute(&path))
    }
}

/// `JoinVideos`: one video after another.
#[derive(Default)]
pub struct JoinVideos;

impl Node for JoinVideos {
    fn schema() -> NodeSchema {
        NodeSchema::new("JoinVideos")
            .category("video")
            .doc(
                "Plays the second video after the first, dropping the second's first `overlap` \
                 frames (those it repeats of the first, as a scene extension opens with the \
                 frames it continues). Sizes and frame rates must match.",
            )
            .input(Port::new("first", "Video").doc("The first video."))
            .input(Port::new("second", "Video").doc("The video that follows."))
            .input(
                Port::new("overlap", "Int")
                    .default(0i64)
                    .range(0.0, 100000.0)
                    .doc("The second's opening frames to drop."),
            )
            .output(Port::new("video", "Video").doc("Both, one after the other."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let a: Video = ctx.input("first")?;
        let b: Video = ctx.input("second")?;
        let overlap = ctx.input::<i64>("overlap")?.max(0) as usize;
        let ((ta, ha, wa), (tb, hb, wb)) = (a.layout()?, b.layout()?);
        if (ha, wa) != (hb, wb) {
            bail!("the videos are {wa}×{ha} and {wb}×{hb}: join videos of one size");
        }
        let fps = match (a.fps, b.fps) {
            (Some(x), Some(y)) if (x - y).abs() > 1e-9 => {
                bail!("the videos run at {x} and {y} fps: join videos of one rate")
            }
            (x, y) => x.or(y),
        };
        if overlap >= tb {
            bail!("overlap {overlap} drops all {tb} frames of the second video");
        }
        let kept = b.frames.split(0, &[overlap, tb - overlap])?.remove(1);
        let first = a.frames.cast(DType::F32)?;
        let frames = ditflow_plugin::ops::concat(&[&first, &kept.cast(DType::F32)?], 0)?;
        debug_assert_eq!(frames.shape()[0], ta + tb - overlap);
        let joined = Video {
            frames: frames.with_kind(Kind::Video)?,
            fps,
        };
        ctx.set_output("video", joined)
    }
}

/// `PixelsToVideo`: a pixel-space video latent as a video.
#[derive(Default)]
pub struct PixelsToVideo;

impl Node for PixelsToVideo {
    fn schema() -> NodeSchema {
        NodeSchema::new("PixelsToVideo")
            .category("video")
            .doc(
                "Reads a video latent of a model trained on the frames themselves, [1, 3, \
                 frames, height, width] in [-1, 1], as a video at fps: (x + 1) / 2, clamped to \
                 [0, 1]. (A latent-space model's video goes through its VAE: DecodeVideo.)",
            )
            .input(Port::new("latent", "Latent").doc("[1, 3, frames, height, width] in [-1, 1]."))
            .input(
                Port::new("fps", "Float")
                    .default(16.0)
                    .range(0.001, 1000.0)
                    .doc("The frame rate."),
            )
            .output(Port::new("video", "Video").doc("The frames."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let latent: Tensor = ctx.input("latent")?;
        let s = latent.shape().to_vec();
        let [1, 3, t, h, w] = s[..] else {
            bail!("the latent must be [1, 3, frames, height, width] (RGB pixels), got {s:?}");
        };
        let x = latent.cast(DType::F32)?.to_device(Device::Cpu)?;
        let x = x.as_f32()?;
        let mut frames = vec![0f32; t * h * w * 3];
        for c in 0..3 {
            for (i, v) in x[c * t * h * w..(c + 1) * t * h * w].iter().enumerate() {
                frames[i * 3 + c] = ((v + 1.0) * 0.5).clamp(0.0, 1.0);
            }
        }
        let frames = Tensor::from_f32(Kind::Video, &[t, h, w, 3], &frames)?;
        ctx.set_output("video", Video::new(frames, ctx.input("fps")?)?)
    }
}

/// `LoadVideo`: a video file (or a folder of frames), with its sound.
#[derive(Default)]
pub struct LoadVideo;

impl Node for LoadVideo {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadVideo")
            .category("video")
            .doc(
                "Reads a video as f32 frames in [0, 1] with its frame rate: an animated PNG \
                 (or a still PNG, one frame), a folder of PNG frames (in name order, with \
                 audio.wav beside them as the sound when present), or through ffmpeg any file \
                 it reads (MP4, WebM, GIF...). The sound is silence (mono, 48 kHz) when there \
                 is none. Cached until the file or folder changes.",
            )
            .input(Port::new("path", "String").doc(
                "The video file or frame folder; a relative path is taken from the graph's folder.",
            ))
            .input(
                Port::new("fps", "Float")
                    .default(0.0)
                    .range(0.0, 1000.0)
                    .doc("The frame rate; 0 takes the file's (a frame folder has none: 16)."),
            )
            .input(
                Port::new("max_frames", "Int")
                    .default(0i64)
                    .range(0.0, MAX_FRAMES as f64)
                    .doc("Reads at most this many frames; 0 reads all."),
            )
            .output(
                Port::new("video", "Video")
                    .doc("Frames [frames, height, width, 3] with a frame rate."),
            )
            .output(Port::new("audio", "Audio").doc("Its sound, or silence of the same length."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let path = input_path(ctx, "path")?;
        let fps_in: f64 = ctx.input("fps")?;
        let max = match ctx.input::<i64>("max_frames")? {
            n if n > 0 => (n as usize).min(MAX_FRAMES),
            _ => MAX_FRAMES,
        };
        let failed = |e: Error| Error(format!("cannot read {}: {e}", path.display()));
        let (data, (t, h, w), fps, audio) = if path.is_dir() {
            let (data, layout) = read_sequence(&path).map_err(failed)?;
            let wav = path.join("audio.wav");
            let audio = wav
                .is_file()
                .then(|| load_audio(&wav, "LoadVideo"))
                .transpose()?;
            (data, layout, None, audio)
        } else if container_of(&path.to_string_lossy()) == Container::Apng {
            let bytes = std::fs::read(&path).map_err(|e| io_error("cannot read", &path, &e))?;
            let (data, layout, fps) = decode_apng(&bytes).map_err(failed)?;
            let wav = path.with_extension("wav");
            let audio = wav
                .is_file()
                .then(|| load_audio(&wav, "LoadVideo"))
                .transpose()?;
            (data, layout, fps, audio)
        } else {
            let p = ffmpeg::probe(&path, "LoadVideo")?;
            let rgb = ffmpeg::decode_frames(&path, &p, max, "LoadVideo")?;
            let t = rgb.len() / (p.width * p.height * 3);
            let data = rgb.iter().map(|&v| v as f32 / 255.0).collect();
            let audio = if p.has_audio {
                Some(load_audio(&path, "LoadVideo")?)
            } else {
                None
            };
            (data, (t, p.height, p.width), Some(p.fps), audio)
        };
        let t_kept = t.min(max);
        let fps = if fps_in > 0.0 {
            fps_in
        } else {
            fps.unwrap_or(16.0)
        };
        let frames =
            Tensor::from_f32(Kind::Video, &[t_kept, h, w, 3], &data[..t_kept * h * w * 3])?;
        let audio = match audio {
            Some(a) => a,
            None => {
                let n = (t_kept as f64 / fps * 48000.0).round() as usize;
                Audio::new(
                    Tensor::from_f32(Kind::Audio, &[1, n], &vec![0.0; n])?,
                    48000.0,
                )?
            }
        };
        ctx.set_output("video", Video::new(frames, fps)?)?;
        ctx.set_output("audio", audio)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `VideoFrame`: one frame as an image.
#[derive(Default)]
pub struct VideoFrame;

impl Node for VideoFrame {
    fn schema() -> NodeSchema {
        NodeSchema::new("VideoFrame")
            .category("video")
            .doc("One frame of a video as an image; a negative index counts from the end.")
            .input(Port::new("video", "Video").doc("Frames [frames, height, width, 3]."))
            .input(
                Port::new("index", "Int")
                    .default(0i64)
                    .doc("The frame; -1 is the last."),
            )
            .output(Port::new("image", "Image").doc("The frame [height, width, 3]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let video: Video = ctx.input("video")?;
        let index: i64 = ctx.input("index")?;
        let (t, h, w) = video_layout(video.frames.shape())?;
        let i = if index < 0 { t as i64 + index } else { index };
        if i < 0 || i >= t as i64 {
            bail!("frame {index} of a {t}-frame video");
        }
        let frame = video
            .frames
            .slice(0, i, i + 1, 1)?
            .reshape(&[h as i64, w as i64, 3])?
            .with_kind(Kind::Image)?;
        ctx.set_output("image", frame)
    }
}

/// `VideoRate`: frames with a frame rate.
#[derive(Default)]
pub struct VideoRate;

impl Node for VideoRate {
    fn schema() -> NodeSchema {
        NodeSchema::new("VideoRate")
            .category("video")
            .doc("Gives video frames a frame rate (replacing any they had).")
            .input(Port::new("video", "Video").doc("Frames [frames, height, width, 3]."))
            .input(
                Port::new("fps", "Float")
                    .range(0.001, 1000.0)
                    .doc("Frames per second."),
            )
            .output(Port::new("video", "Video").doc("The frames at that rate."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let video: Video = ctx.input("video")?;
        let fps: f64 = ctx.input("fps")?;
        ctx.set_output("video", Video::new(video.frames, fps)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_delays_are_exact_for_usual_rates() {
        assert_eq!(frame_delay(16.0), (1, 16));
        assert_eq!(frame_delay(24.0), (1, 24));
        assert_eq!(frame_delay(30000.0 / 1001.0), (1001, 30000));
        assert_eq!(frame_delay(12.5), (100, 1250));
    }

    #[test]
    fn apng_round_trips_frames_and_rate() {
        let (t, h, w) = (3, 2, 5);
        let rgb: Vec<u8> = (0..t * h * w * 3).map(|i| (i * 7 % 256) as u8).collect();
        let png = encode_apng(&rgb, (t, h, w), 24.0).unwrap();
        let (data, layout, fps) = decode_apng(&png).unwrap();
        assert_eq!(layout, (t, h, w));
        assert_eq!(fps, Some(24.0));
        let back: Vec<u8> = data.iter().map(|&v| unit_to_u8(v)).collect();
        assert_eq!(back, rgb);
    }

    #[test]
    fn containers_follow_the_path() {
        assert_eq!(container_of("out.png"), Container::Apng);
        assert_eq!(container_of("out.APNG"), Container::Apng);
        assert_eq!(container_of("frames/"), Container::PngSequence);
        assert_eq!(container_of("frames"), Container::PngSequence);
        assert_eq!(container_of("clip.mp4"), Container::Ffmpeg);
    }
}
