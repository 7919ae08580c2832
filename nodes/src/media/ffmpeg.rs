//! ffmpeg as an optional helper for containers ditflow does not write itself (MP4, WebM, and
//! reading any video file): found on `PATH` (or at `DITFLOW_FFMPEG`), fed raw RGB frames through
//! a pipe, and asked for raw frames back. When it is missing, the message says what needs it,
//! how to install it, and which formats work without it.

use ditflow_plugin::prelude::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The formats that need no ffmpeg, for messages.
const WITHOUT_FFMPEG: &str = "WAV audio, and APNG or PNG-sequence video, need no ffmpeg";

/// The ffmpeg (or ffprobe) program: `DITFLOW_FFMPEG` (its folder is searched for ffprobe), or
/// the first on `PATH`. `who` names what needs it, for the error.
pub fn program(name: &str, who: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("DITFLOW_FFMPEG") {
        let p = PathBuf::from(p);
        let p = if name == "ffmpeg" {
            p
        } else {
            p.with_file_name(name)
        };
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "{who} needs {name}, which is not at {} (from DITFLOW_FFMPEG); {WITHOUT_FFMPEG}",
            p.display()
        );
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.ok_or_else(|| {
        Error(format!(
            "{who} needs {name}, which is not on PATH: install ffmpeg (Debian and Ubuntu: \
             apt install ffmpeg) or point DITFLOW_FFMPEG at it; {WITHOUT_FFMPEG}"
        ))
    })
}

/// The last lines of a tool's error output, for a message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Encodes 8-bit RGB frames (`frames × height × width × 3` bytes) at `fps` into `out`, with the
/// audio file `audio` (and its channel count) muxed in when given; the codecs follow the
/// extension (MP4: H.264 and AAC; WebM: VP9 and Opus).
pub fn encode(
    rgb: &[u8],
    (frames, height, width): (usize, usize, usize),
    fps: f64,
    audio: Option<(&Path, usize)>,
    out: &Path,
    who: &str,
) -> Result<()> {
    let ffmpeg = program("ffmpeg", who)?;
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (video_codec, audio_codec): (&[&str], &[&str]) = match ext.as_str() {
        "webm" => (
            &["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "30"],
            &["-c:a", "libopus"],
        ),
        _ => (
            &["-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p"],
            &["-c:a", "aac"],
        ),
    };
    let mut cmd = Command::new(&ffmpeg);
    cmd.args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{width}x{height}"), "-r", &format!("{fps}")])
        .args(["-i", "-"]);
    if let Some((a, _)) = audio {
        cmd.arg("-i").arg(a);
    }
    cmd.args(video_codec);
    // yuv420p needs even sides.
    if ext != "webm" && (width % 2 == 1 || height % 2 == 1) {
        cmd.args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]);
    }
    if let Some((_, channels)) = audio {
        // The default layout for the channel count (the encoders refuse some WAV masks).
        cmd.args(audio_codec)
            .args(["-ac", &channels.to_string()])
            .arg("-shortest");
    }
    cmd.arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error(format!("{who}: cannot start {}: {e}", ffmpeg.display())))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let frame_bytes = height * width * 3;
    debug_assert_eq!(rgb.len(), frames * frame_bytes);
    // Written from a thread while stderr is read here, so neither pipe can fill up and stall.
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let written = stdin.write_all(rgb);
    drop(stdin);
    let status = child
        .wait()
        .map_err(|e| Error(format!("{who}: ffmpeg did not finish: {e}")))?;
    let err = reader.join().unwrap_or_default();
    if !status.success() || written.is_err() {
        bail!(
            "{who}: ffmpeg could not write {}: {}",
            out.display(),
            tail(&err)
        );
    }
    Ok(())
}

/// What ffprobe says of a file's first video stream, and whether it has audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub width: usize,
    pub height: usize,
    pub fps: f64,
    pub has_audio: bool,
}

/// Probes `path` with ffprobe.
pub fn probe(path: &Path, who: &str) -> Result<Probe> {
    let ffprobe = program("ffprobe", who)?;
    let out = Command::new(&ffprobe)
        .args(["-v", "error", "-show_entries"])
        .args([
            "stream=codec_type,width,height,avg_frame_rate,r_frame_rate",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .map_err(|e| Error(format!("{who}: cannot start {}: {e}", ffprobe.display())))?;
    if !out.status.success() {
        bail!(
            "{who}: ffprobe cannot read {}: {}",
            path.display(),
            tail(&out.stderr)
        );
    }
    parse_probe(&out.stdout).map_err(|e| Error(format!("{who}: {}: {e}", path.display())))
}

/// Reads ffprobe's JSON (`-show_entries stream=... -of json`).
pub fn parse_probe(json: &[u8]) -> Result<Probe> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| Error(format!("ffprobe's answer: {e}")))?;
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    let has_audio = streams.iter().any(|s| s["codec_type"] == "audio");
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .ok_or_else(|| Error::new("the file has no video stream"))?;
    let side = |k: &str| video[k].as_u64().filter(|&n| n > 0).map(|n| n as usize);
    let (Some(width), Some(height)) = (side("width"), side("height")) else {
        bail!("the video stream has no size");
    };
    let rate = |k: &str| {
        let s = video[k].as_str()?;
        let (n, d) = s.split_once('/').unwrap_or((s, "1"));
        let (n, d): (f64, f64) = (n.parse().ok()?, d.parse().ok()?);
        (n > 0.0 && d > 0.0).then_some(n / d)
    };
    let fps = rate("avg_frame_rate")
        .or_else(|| rate("r_frame_rate"))
        .ok_or_else(|| Error::new("the video stream has no frame rate"))?;
    Ok(Probe {
        width,
        height,
        fps,
        has_audio,
    })
}

/// Decodes `path`'s video frames as 8-bit RGB at the probed size (`at most max_frames`).
pub fn decode_frames(path: &Path, p: &Probe, max_frames: usize, who: &str) -> Result<Vec<u8>> {
    let ffmpeg = program("ffmpeg", who)?;
    let out = Command::new(&ffmpeg)
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-frames:v", &max_frames.to_string()])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .map_err(|e| Error(format!("{who}: cannot start {}: {e}", ffmpeg.display())))?;
    if !out.status.success() {
        bail!(
            "{who}: ffmpeg cannot decode {}: {}",
            path.display(),
            tail(&out.stderr)
        );
    }
    let frame = p.width * p.height * 3;
    if out.stdout.len() < frame || out.stdout.len() % frame != 0 {
        bail!(
            "{who}: ffmpeg gave {} bytes for {}x{} frames of {}",
            out.stdout.len(),
            p.width,
            p.height,
            path.display()
        );
    }
    Ok(out.stdout)
}

/// Decodes `path`'s audio into a temporary WAV file (32-bit float) and returns its path.
pub fn decode_audio_to_wav(path: &Path, who: &str) -> Result<TempPath> {
    let ffmpeg = program("ffmpeg", who)?;
    let wav = TempPath::new("wav");
    let out = Command::new(&ffmpeg)
        .args(["-v", "error", "-y", "-i"])
        .arg(path)
        .args(["-vn", "-c:a", "pcm_f32le"])
        .arg(wav.path())
        .output()
        .map_err(|e| Error(format!("{who}: cannot start {}: {e}", ffmpeg.display())))?;
    if !out.status.success() {
        bail!(
            "{who}: ffmpeg cannot read the audio of {}: {}",
            path.display(),
            tail(&out.stderr)
        );
    }
    Ok(wav)
}

/// A temporary file, removed when dropped.
pub struct TempPath(PathBuf);

impl TempPath {
    /// A fresh name in the system's temporary folder, ending in `.ext`.
    pub fn new(ext: &str) -> TempPath {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "ditflow-{}-{nanos}-{}.{ext}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        TempPath(std::env::temp_dir().join(name))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_json_gives_size_rate_and_audio() {
        let json = br#"{"streams": [
            {"codec_type": "video", "width": 64, "height": 48, "r_frame_rate": "30000/1001", "avg_frame_rate": "0/0"},
            {"codec_type": "audio"}]}"#;
        let p = parse_probe(json).unwrap();
        assert_eq!((p.width, p.height, p.has_audio), (64, 48, true));
        assert!((p.fps - 29.97).abs() < 1e-2);
        assert!(parse_probe(br#"{"streams": [{"codec_type": "audio"}]}"#)
            .unwrap_err()
            .0
            .contains("no video"));
    }
}
