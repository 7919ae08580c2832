//! Audio and video files end to end: WAV in and out, APNG and PNG-sequence video with their
//! sound, MP4 through ffmpeg when it is installed (skipped otherwise), and the message when
//! ffmpeg is missing.

mod common;

use ditflow::{Graph, RunOptions, Runtime, Session, Value};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn session() -> Session {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugin loads");
    }
    Session::new(Arc::new(rt))
}

/// Runs `yaml` with outputs under `out`; the report's failures as an error.
fn run(yaml: &str, out: &Path) -> Result<ditflow::RunReport, String> {
    let g = Graph::from_yaml(yaml, "media.yaml", Path::new(".")).map_err(|e| e.to_string())?;
    let opts = RunOptions {
        out_dir: out.to_path_buf(),
        ..RunOptions::default()
    };
    let report = session().run(&g, &[], &opts).map_err(|e| e.to_string())?;
    match report.failed.first() {
        Some(f) => Err(format!("{}: {}", f.node, f.error)),
        None => Ok(report),
    }
}

/// A 16-bit PCM WAV file, written by hand (the header is 44 bytes).
fn write_wav16(path: &Path, channels: u16, rate: u32, interleaved: &[i16]) {
    let data_len = (interleaved.len() * 2) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&channels.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
    b.extend_from_slice(&(channels * 2).to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in interleaved {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

/// The tensor and rate of an Audio or Video output (`[tensor, rate]`).
fn media(report: &ditflow::RunReport, name: &str) -> (Vec<usize>, Vec<f32>, f64) {
    common::media_value(
        report
            .output(name)
            .unwrap_or_else(|| panic!("output {name}")),
    )
}

fn q(p: &Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

/// A 2-frame-per-colour test clip: 6 frames of 12x8, each a flat colour with a bright square.
fn write_frames(dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let (w, h) = (12usize, 8usize);
    let mut all = Vec::new();
    for f in 0..6usize {
        let mut px = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let inside = (x / 3 == f % 4) && (2..6).contains(&y);
                let c = [(f * 40) as u8, 100, (250 - f * 30) as u8];
                px.extend(if inside { [255, 255, 255] } else { c });
            }
        }
        let file = std::fs::File::create(dir.join(format!("f{f:03}.png"))).unwrap();
        let mut enc = png::Encoder::new(file, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(&px).unwrap();
        all.extend(px);
    }
    all
}

#[test]
fn wav_files_load_and_save_with_their_rate() {
    // Stereo 16-bit in; f32 WAV out (exact), read back equal; pcm16 out within half a step.
    let dir = common::temp_dir("media-wav");
    let tone: Vec<i16> = (0..200)
        .flat_map(|i| {
            let v = ((i as f32 * 0.3).sin() * 20000.0) as i16;
            [v, -v / 2]
        })
        .collect();
    write_wav16(&dir.join("in.wav"), 2, 22050, &tone);
    let yaml = format!(
        r#"version: 1
nodes:
  a: {{type: LoadAudio, inputs: {{path: {i}}}}}
  s: {{type: SaveAudio, inputs: {{audio: a.audio, path: out.wav}}}}
  s16: {{type: SaveAudio, inputs: {{audio: a.audio, path: out16.wav, format: pcm16}}}}
  b: {{type: LoadAudio, inputs: {{path: s.path}}}}
  c: {{type: LoadAudio, inputs: {{path: s16.path}}}}
  r: {{type: AudioRate, inputs: {{audio: a.audio, sample_rate: 8000}}}}
outputs:
  a: a.audio
  b: b.audio
  c: c.audio
  r: r.audio
"#,
        i = q(&dir.join("in.wav"))
    );
    let report = run(&yaml, &dir).unwrap();
    let (shape, a, rate) = media(&report, "a");
    assert_eq!((shape.as_slice(), rate), (&[2usize, 200][..], 22050.0));
    // Planar: channel 1 holds the halved, negated copy.
    assert_eq!(a[5], tone[10] as f32 / 32768.0);
    assert_eq!(a[205], tone[11] as f32 / 32768.0);
    let (_, b, rate_b) = media(&report, "b");
    assert_eq!((b, rate_b), (a.clone(), 22050.0));
    let (_, c, _) = media(&report, "c");
    assert!(c
        .iter()
        .zip(&a)
        .all(|(x, y)| (x - y).abs() <= 0.5 / 32768.0 + 1e-6));
    assert_eq!(media(&report, "r").2, 8000.0);
}

#[test]
fn apng_and_frame_folders_keep_frames_rate_and_sound() {
    // A PNG folder at 12 fps -> an APNG with its sound beside it -> read back bit for bit; the
    // folder form too; the last frame as an image.
    let dir = common::temp_dir("media-apng");
    let rgb = write_frames(&dir.join("frames"));
    write_wav16(&dir.join("tone.wav"), 1, 16000, &[1000; 800]);
    let yaml = format!(
        r#"version: 1
nodes:
  v: {{type: LoadVideo, inputs: {{path: {f}, fps: 12}}}}
  a: {{type: LoadAudio, inputs: {{path: {t}}}}}
  s: {{type: SaveVideo, inputs: {{video: v.video, audio: a.audio, path: clip.png}}}}
  back: {{type: LoadVideo, inputs: {{path: s.path}}}}
  seq: {{type: SaveVideo, inputs: {{video: back.video, audio: back.audio, path: seq/}}}}
  back2: {{type: LoadVideo, inputs: {{path: seq.path, fps: 12}}}}
  last: {{type: VideoFrame, inputs: {{video: back2.video, index: -1}}}}
outputs:
  v: v.video
  back: back.video
  sound: back.audio
  back2: back2.video
  sound2: back2.audio
  last: last.image
"#,
        f = q(&dir.join("frames")),
        t = q(&dir.join("tone.wav"))
    );
    let report = run(&yaml, &dir).unwrap();
    let (shape, v, fps) = media(&report, "v");
    assert_eq!((shape.as_slice(), fps), (&[6usize, 8, 12, 3][..], 12.0));
    let want: Vec<f32> = rgb.iter().map(|&b| b as f32 / 255.0).collect();
    assert_eq!(v, want);
    for name in ["back", "back2"] {
        let (shape, frames, fps) = media(&report, name);
        assert_eq!(
            (shape.as_slice(), fps),
            (&[6usize, 8, 12, 3][..], 12.0),
            "{name}"
        );
        assert_eq!(frames, want, "{name}");
    }
    for name in ["sound", "sound2"] {
        let (shape, samples, rate) = media(&report, name);
        assert_eq!(
            (shape.as_slice(), rate),
            (&[1usize, 800][..], 16000.0),
            "{name}"
        );
        assert!(samples.iter().all(|&s| s == 1000.0 / 32768.0), "{name}");
    }
    assert!(dir.join("clip.wav").is_file());
    assert!(dir.join("seq/frame_00005.png").is_file());
    let last = report.output("last").unwrap();
    let Value::Tensor(_, t) = &**last else {
        panic!("an image")
    };
    assert_eq!(t.shape(), &[8, 12, 3]);
    assert_eq!(t.as_f32(), &want[5 * 8 * 12 * 3..]);
}

fn has_ffmpeg() -> bool {
    Command::new("ffmpeg").arg("-version").output().is_ok()
        && Command::new("ffprobe").arg("-version").output().is_ok()
}

#[test]
fn mp4_with_sound_goes_through_ffmpeg() {
    // H.264 is lossy: the frames come back within a mean error of 0.05; the rate and the
    // sound's rate and length (AAC pads by at most a frame of 1024 samples each side) are kept.
    if !has_ffmpeg() {
        eprintln!("skipped: ffmpeg is not on PATH");
        return;
    }
    let dir = common::temp_dir("media-mp4");
    let rgb = write_frames(&dir.join("frames"));
    let n = 16000 / 2;
    let tone: Vec<i16> = (0..n)
        .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
        .collect();
    write_wav16(&dir.join("tone.wav"), 1, 16000, &tone);
    let yaml = format!(
        r#"version: 1
nodes:
  v: {{type: LoadVideo, inputs: {{path: {f}, fps: 12}}}}
  a: {{type: LoadAudio, inputs: {{path: {t}}}}}
  s: {{type: SaveVideo, inputs: {{video: v.video, audio: a.audio, path: clip.mp4}}}}
  back: {{type: LoadVideo, inputs: {{path: s.path}}}}
outputs:
  back: back.video
  sound: back.audio
"#,
        f = q(&dir.join("frames")),
        t = q(&dir.join("tone.wav"))
    );
    let report = run(&yaml, &dir).unwrap();
    let (shape, frames, fps) = media(&report, "back");
    assert_eq!((shape.as_slice(), fps), (&[6usize, 8, 12, 3][..], 12.0));
    let err = frames
        .iter()
        .zip(&rgb)
        .map(|(g, &w)| (g - w as f32 / 255.0).abs() as f64)
        .sum::<f64>()
        / frames.len() as f64;
    assert!(err < 0.05, "mean error {err}");
    let (shape, _, rate) = media(&report, "sound");
    assert_eq!(rate, 16000.0);
    // The audio is cut to the video's 0.5 s (-shortest).
    assert!(shape[1].abs_diff(n) <= 2048, "{shape:?}");
}

#[test]
fn a_missing_ffmpeg_is_a_clear_error_naming_the_node() {
    // The CLI with a PATH that has no ffmpeg: SaveVideo to .mp4 fails before writing, naming
    // ffmpeg, how to install it and the formats that need none; APNG still works.
    let dir = common::temp_dir("media-no-ffmpeg");
    write_frames(&dir.join("frames"));
    let graph = dir.join("g.yaml");
    let yaml = |path: &str| {
        format!(
            "version: 1\nnodes:\n  v: {{type: LoadVideo, inputs: {{path: frames}}}}\n  s: {{type: SaveVideo, inputs: {{video: v.video, path: {path}}}}}\n"
        )
    };
    let empty = common::temp_dir("media-empty-path");
    let ditflow = |yaml_text: String| {
        std::fs::write(&graph, yaml_text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ditflow"))
            .args(["run"])
            .arg(&graph)
            .arg("--plugins")
            .arg(common::plugin_dir())
            .arg("--out")
            .arg(dir.join("out"))
            .env("PATH", &empty)
            .env_remove("DITFLOW_FFMPEG")
            .output()
            .expect("run ditflow")
    };
    let o = ditflow(yaml("clip.mp4"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    for part in ["SaveVideo", "needs ffmpeg", "apt install ffmpeg", "APNG"] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    assert!(!dir.join("out/clip.mp4").exists());
    let o = ditflow(yaml("clip.png"));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(dir.join("out/clip.png").is_file());
}

#[test]
fn encoding_audio_checks_the_vae_s_sample_rate() {
    // The Oobleck fixture takes 8000 Hz stereo: a 16 kHz file is refused naming both rates; an
    // 8 kHz one encodes to [1, 4, samples / 8].
    let dir = common::temp_dir("media-encode-audio");
    let vae = common::repo().join("tests/fixtures/parity/oobleck");
    let tone: Vec<i16> = (0..128)
        .map(|i| ((i as f32 * 0.2).sin() * 9000.0) as i16)
        .collect();
    for (rate, name) in [(16000u32, "fast.wav"), (8000, "ok.wav")] {
        write_wav16(&dir.join(name), 2, rate, &tone);
    }
    let yaml = |file: &str| {
        format!(
            "version: 1\nnodes:\n  v: {{type: LoadOobleck, inputs: {{path: {}}}}}\n  a: {{type: LoadAudio, inputs: {{path: {}}}}}\n  e: {{type: EncodeAudio, inputs: {{vae: v.vae, audio: a.audio}}}}\noutputs:\n  latent: e.latent\n",
            q(&vae),
            q(&dir.join(file))
        )
    };
    let err = run(&yaml("fast.wav"), &dir).unwrap_err();
    assert!(err.contains("16000 Hz") && err.contains("8000 Hz"), "{err}");
    let report = run(&yaml("ok.wav"), &dir).unwrap();
    let latent = report.output("latent").unwrap();
    let Value::Tensor(_, t) = &**latent else {
        panic!("a latent")
    };
    assert_eq!(t.shape(), &[1, 4, 8]);
}

#[test]
fn videos_and_sounds_join_and_pixel_latents_become_frames() {
    // A folder of 6 frames joined after itself without its first 2 frames: 10 frames, the
    // second part from frame 2 on; a 200-sample sound joined after itself less 0.005 s (110
    // samples at 22050 Hz); a saved tensor as a pixel-space latent: (x + 1) / 2, clamped, in
    // [frames, h, w, 3] order; SaveVideo's scale writes 2x the size.
    let dir = common::temp_dir("media-join");
    let frames = write_frames(&dir.join("in"));
    let tone: Vec<i16> = (0..200).map(|i| (i * 100) as i16).collect();
    write_wav16(&dir.join("in.wav"), 1, 22050, &tone);
    // A [1, 3, 2, 1, 2] latent: channel c, frame f, pixel x = (c·4 + f·2 + x) / 4 − 1.2.
    let latent: Vec<f32> = (0..12).map(|i| i as f32 / 4.0 - 1.2).collect();
    let bytes: Vec<u8> = latent.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = format!(
        "{{\"x\":{{\"dtype\":\"F32\",\"shape\":[1,3,2,1,2],\"data_offsets\":[0,{}]}}}}",
        bytes.len()
    );
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header.as_bytes());
    st.extend_from_slice(&bytes);
    std::fs::write(dir.join("latent.safetensors"), st).unwrap();
    let yaml = format!(
        r#"version: 1
nodes:
  v: {{type: LoadVideo, inputs: {{path: {v}, fps: 12}}}}
  j: {{type: JoinVideos, inputs: {{first: v.video, second: v.video, overlap: 2}}}}
  a: {{type: LoadAudio, inputs: {{path: {a}}}}}
  ja: {{type: JoinAudio, inputs: {{first: a.audio, second: a.audio, overlap: 0.005}}}}
  t: {{type: LoadTensor, inputs: {{path: {l}, name: x}}}}
  lat: {{type: TensorAs, inputs: {{tensor: t.tensor, kind: Latent}}}}
  p: {{type: PixelsToVideo, inputs: {{latent: lat.value, fps: 4}}}}
  s: {{type: SaveVideo, inputs: {{video: j.video, path: big.png, scale: 2}}}}
  back: {{type: LoadVideo, inputs: {{path: s.path}}}}
  bad: {{type: JoinVideos, inputs: {{first: v.video, second: p.video}}}}
outputs:
  j: j.video
  ja: ja.audio
  p: p.video
  back: back.video
"#,
        v = q(&dir.join("in")),
        a = q(&dir.join("in.wav")),
        l = q(&dir.join("latent.safetensors"))
    );
    let g = Graph::from_yaml(&yaml, "join.yaml", Path::new(".")).unwrap();
    let opts = RunOptions {
        out_dir: dir.clone(),
        ..RunOptions::default()
    };
    let report = session().run(&g, &[], &opts).unwrap();
    let (shape, j, fps) = media(&report, "j");
    assert_eq!((shape.as_slice(), fps), (&[10usize, 8, 12, 3][..], 12.0));
    let frame = 8 * 12 * 3;
    let want = |i: usize| frames[i] as f32 / 255.0;
    assert!((0..6 * frame).all(|i| (j[i] - want(i)).abs() < 1e-6));
    assert!((0..4 * frame).all(|i| (j[6 * frame + i] - want(2 * frame + i)).abs() < 1e-6));
    let (shape, ja, rate) = media(&report, "ja");
    assert_eq!((shape.as_slice(), rate), (&[1usize, 290][..], 22050.0));
    assert_eq!(ja[200], tone[110] as f32 / 32768.0);
    let (shape, p, fps) = media(&report, "p");
    assert_eq!((shape.as_slice(), fps), (&[2usize, 1, 2, 3][..], 4.0));
    for f in 0..2 {
        for x in 0..2 {
            for c in 0..3 {
                let v = latent[c * 4 + f * 2 + x];
                let want = ((v + 1.0) / 2.0).clamp(0.0, 1.0);
                assert!((p[(f * 2 + x) * 3 + c] - want).abs() < 1e-6);
            }
        }
    }
    assert_eq!(media(&report, "back").0, vec![10, 16, 24, 3]);
    let f = report.failed.iter().find(|f| &*f.node == "bad").unwrap();
    assert!(f.error.contains("one size"), "{}", f.error);
}
