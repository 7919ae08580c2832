//! Audio and video values: samples or frames with their rate.
//!
//! - [`Audio`]: f32 samples `[channels, samples]` (in [-1, 1] for full scale) and a sample rate
//!   in Hz.
//! - [`Video`]: f32 frames `[frames, height, width, 3]` in [0, 1] and a frame rate in frames
//!   per second.
//!
//! On a graph link either is a List `[tensor, rate]` (an Audio or Video tensor and a Float), or a
//! bare Audio or Video tensor whose rate is unknown (what a model's forward gives). The host
//! checks both shapes on `Audio` and `Video` ports; these types read and write either, so nodes
//! never see the encoding, and a node that needs the rate says so when it is missing.

use crate::{Error, FromValue, IntoValue, Kind, Result, Tensor, Value};

/// Audio samples with their rate.
#[derive(Clone, Debug)]
pub struct Audio {
    /// `[channels, samples]`, f32.
    pub samples: Tensor,
    /// Hz; `None` when the value carried no rate.
    pub sample_rate: Option<f64>,
}

/// Video frames with their rate.
#[derive(Clone, Debug)]
pub struct Video {
    /// `[frames, height, width, 3]`, f32 in [0, 1].
    pub frames: Tensor,
    /// Frames per second; `None` when the value carried no rate.
    pub fps: Option<f64>,
}

impl Audio {
    /// Samples `[channels, samples]` at `sample_rate` Hz.
    pub fn new(samples: Tensor, sample_rate: f64) -> Result<Audio> {
        check_rate("sample rate", sample_rate)?;
        let s = samples.shape();
        if s.len() != 2 || s[0] == 0 {
            return Err(Error(format!(
                "audio samples must be [channels, samples] with at least one channel, got {s:?}"
            )));
        }
        Ok(Audio {
            samples,
            sample_rate: Some(sample_rate),
        })
    }

    pub fn channels(&self) -> usize {
        self.samples.shape().first().copied().unwrap_or(0)
    }

    /// Samples per channel.
    pub fn len(&self) -> usize {
        self.samples.shape().get(1).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sample rate, or an error saying `who` needs it.
    pub fn rate(&self, who: &str) -> Result<f64> {
        self.sample_rate.ok_or_else(|| {
            Error(format!(
                "{who} needs the audio's sample rate, and this audio has none (give it one with \
                 AudioRate)"
            ))
        })
    }

    /// Duration in seconds, when the rate is known.
    pub fn seconds(&self) -> Option<f64> {
        self.sample_rate.map(|r| self.len() as f64 / r)
    }
}

impl Video {
    /// Frames `[frames, height, width, 3]` at `fps`.
    pub fn new(frames: Tensor, fps: f64) -> Result<Video> {
        check_rate("frame rate", fps)?;
        video_layout(frames.shape())?;
        Ok(Video {
            frames,
            fps: Some(fps),
        })
    }

    /// `(frames, height, width)`.
    pub fn layout(&self) -> Result<(usize, usize, usize)> {
        video_layout(self.frames.shape())
    }

    /// The frame rate, or an error saying `who` needs it.
    pub fn rate(&self, who: &str) -> Result<f64> {
        self.fps.ok_or_else(|| {
            Error(format!(
                "{who} needs the video's frame rate, and this video has none (give it one with \
                 VideoRate)"
            ))
        })
    }
}

/// `(frames, height, width)` of a `[frames, height, width, 3]` shape with no empty side.
pub fn video_layout(shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [t, h, w, 3] if t > 0 && h > 0 && w > 0 => Ok((t, h, w)),
        _ => Err(Error(format!(
            "video frames must be [frames, height, width, 3] with no empty side, got {shape:?}"
        ))),
    }
}

fn check_rate(what: &str, rate: f64) -> Result<()> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(Error(format!("a {what} must be positive, got {rate}")))
    }
}

/// Reads `[tensor, rate]` or a bare tensor of `kind`.
fn from_media_value(value: &Value, kind: Kind) -> Result<(Tensor, Option<f64>)> {
    let name = if kind == Kind::Audio {
        "an Audio"
    } else {
        "a Video"
    };
    let bad = |what: &str| {
        Error(format!(
            "{name} is a tensor or a [tensor, rate] list; {what}"
        ))
    };
    if value.kind() != Kind::List {
        return Ok((value.as_tensor().map_err(|e| bad(&e.0))?, None));
    }
    let items = value.as_list()?;
    let [tensor, rate] = items.as_slice() else {
        return Err(bad(&format!("this list has {} items", items.len())));
    };
    let tensor = tensor
        .as_tensor()
        .map_err(|_| bad("its first item is not a tensor"))?;
    let rate = rate
        .as_float()
        .map_err(|_| bad("its second item is not a number"))?;
    Ok((tensor, Some(rate)))
}

fn into_media_value(tensor: Tensor, rate: Option<f64>, kind: Kind) -> Value {
    let tensor = tensor.with_kind(kind).unwrap_or(tensor);
    match rate {
        Some(r) => Value::list(vec![tensor.into_value(), Value::float(r)]),
        None => tensor.into_value(),
    }
}

impl FromValue for Audio {
    fn from_value(value: &Value) -> Result<Self> {
        let (samples, sample_rate) = from_media_value(value, Kind::Audio)?;
        if let Some(r) = sample_rate {
            check_rate("sample rate", r)?;
        }
        if samples.shape().len() != 2 {
            return Err(Error(format!(
                "audio samples must be [channels, samples], got {:?}",
                samples.shape()
            )));
        }
        Ok(Audio {
            samples,
            sample_rate,
        })
    }
}

impl IntoValue for Audio {
    fn into_value(self) -> Value {
        into_media_value(self.samples, self.sample_rate, Kind::Audio)
    }
}

impl FromValue for Video {
    fn from_value(value: &Value) -> Result<Self> {
        let (frames, fps) = from_media_value(value, Kind::Video)?;
        if let Some(r) = fps {
            check_rate("frame rate", r)?;
        }
        video_layout(frames.shape())?;
        Ok(Video { frames, fps })
    }
}

impl IntoValue for Video {
    fn into_value(self) -> Value {
        into_media_value(self.frames, self.fps, Kind::Video)
    }
}
