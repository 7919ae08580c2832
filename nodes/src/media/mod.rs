//! Audio and video files: WAV through `hound`, animated PNG and PNG sequences through `png`, and
//! MP4, WebM and the rest through ffmpeg when it is installed ([`ffmpeg`]). The values are the
//! SDK's [`ditflow_plugin::Audio`] and [`ditflow_plugin::Video`]: samples or frames with their
//! rate.

pub mod audio;
pub mod ffmpeg;
pub mod video;
