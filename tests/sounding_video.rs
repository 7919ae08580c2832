//! The bundled sounding-video demo (`models/sounding`, trained by
//! `tools/train_sounding_video.py`) through `graphs/text_to_sounding_video.yaml`: over 8 prompts,
//! the tones must start where the generated shape touches the floor (event F1 within ±1 frame,
//! and the lag between them), clearly less so with the bridge switched off, which shows that the
//! bridge carries the sync; and the pitch must be the one the prompt's shape sets.

mod common;

use ditflow::{ArgValue, Graph, RunOptions, Runtime, Session, Value};
use std::sync::Arc;

/// The demo's pitches (Hz) per shape, as the training script sets them.
const PITCHES: &[(&str, f64)] = &[("circle", 392.0), ("square", 523.25), ("triangle", 783.99)];
const PROMPTS: &[(&str, &str)] = &[
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("white", "square"),
    ("purple", "triangle"),
    ("red", "square"),
    ("green", "triangle"),
];

/// Frames where the shape touches the floor: local maxima of the vertical centroid of what
/// differs from the background (each pixel's median over the clip, since the shape moves),
/// within a pixel of the lowest the centroid gets. `frames` is `[T, H, W, 3]`.
fn visual_bounces(shape: &[usize], frames: &[f32]) -> Vec<usize> {
    let (t, h, w) = (shape[0], shape[1], shape[2]);
    let at = |f: usize, y: usize, x: usize, c: usize| frames[((f * h + y) * w + x) * 3 + c];
    let mut background = vec![0f32; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut v: Vec<f32> = (0..t).map(|f| at(f, y, x, c)).collect();
                v.sort_by(f32::total_cmp);
                background[(y * w + x) * 3 + c] = v[t / 2];
            }
        }
    }
    let centroid: Vec<f32> = (0..t)
        .map(|f| {
            let (mut sum, mut weight) = (0f32, 0f32);
            for y in 0..h {
                for x in 0..w {
                    let d: f32 = (0..3)
                        .map(|c| (at(f, y, x, c) - background[(y * w + x) * 3 + c]).abs())
                        .sum();
                    sum += d * y as f32;
                    weight += d;
                }
            }
            sum / weight.max(1e-6)
        })
        .collect();
    let lowest = centroid.iter().copied().fold(f32::MIN, f32::max);
    (0..t)
        .filter(|&f| {
            let left = if f > 0 { centroid[f - 1] } else { f32::MIN };
            let right = if f + 1 < t { centroid[f + 1] } else { f32::MIN };
            centroid[f] >= left && centroid[f] > right && centroid[f] > lowest - 1.0
        })
        .collect()
}

/// Onsets as frame indices: where the 8 ms RMS envelope rises through 35% of its peak, at
/// least 0.3 s apart.
fn audio_onsets(samples: &[f32], rate: f64, fps: f64) -> Vec<usize> {
    let win = (rate / 125.0) as usize;
    let env: Vec<f32> = samples
        .chunks_exact(win)
        .map(|c| (c.iter().map(|x| x * x).sum::<f32>() / win as f32).sqrt())
        .collect();
    let threshold = 0.35 * env.iter().copied().fold(0.0, f32::max);
    let mut out = Vec::new();
    let mut last: Option<usize> = None;
    for i in 0..env.len() {
        let rising = env[i] >= threshold && (i == 0 || env[i - 1] < threshold);
        let apart = last.is_none_or(|l| (i - l) as f64 * win as f64 / rate > 0.3);
        if rising && apart {
            out.push((i as f64 * win as f64 / rate * fps).round() as usize);
            last = Some(i);
        }
    }
    out
}

/// Event F1 of `hyp` against `reference` within `tol` frames (each event matched once, the
/// nearest first), and the matched lags (hyp − ref).
fn event_f1(reference: &[usize], hyp: &[usize], tol: i64) -> (f64, Vec<i64>) {
    let mut used = vec![false; hyp.len()];
    let mut lags = Vec::new();
    for &r in reference {
        let best = (0..hyp.len())
            .filter(|&j| !used[j] && (hyp[j] as i64 - r as i64).abs() <= tol)
            .min_by_key(|&j| (hyp[j] as i64 - r as i64).abs());
        if let Some(j) = best {
            used[j] = true;
            lags.push(hyp[j] as i64 - r as i64);
        }
    }
    let hits = lags.len() as f64;
    let (p, r) = (
        hits / hyp.len().max(1) as f64,
        hits / reference.len().max(1) as f64,
    );
    let f1 = if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    };
    (f1, lags)
}

/// The strongest frequency between 150 Hz and 2 kHz (a Hann-windowed DFT every 2 Hz, in f64).
fn pitch(samples: &[f32], rate: f64) -> f64 {
    let n = samples.len();
    let windowed: Vec<f64> = samples
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos();
            x as f64 * w
        })
        .collect();
    let mut best = (0.0, 0.0);
    let mut f = 150.0;
    while f <= 2000.0 {
        let step = 2.0 * std::f64::consts::PI * f / rate;
        let (mut re, mut im) = (0.0, 0.0);
        for (i, x) in windowed.iter().enumerate() {
            let a = step * i as f64;
            re += x * a.cos();
            im += x * a.sin();
        }
        let power = re * re + im * im;
        if power > best.1 {
            best = (f, power);
        }
        f += 2.0;
    }
    best.0
}

fn nearest_shape(f: f64) -> &'static str {
    PITCHES
        .iter()
        .min_by(|a, b| (f / a.1).ln().abs().total_cmp(&(f / b.1).ln().abs()))
        .unwrap()
        .0
}

struct Score {
    f1: f64,
    median_lag: f64,
    pitches_right: usize,
}

fn score(session: &Session, g: &Graph, bridged: bool) -> Score {
    let out = common::temp_dir("sounding_video");
    let (mut f1s, mut lags, mut right) = (Vec::new(), Vec::new(), 0);
    for (i, (colour, shape)) in PROMPTS.iter().enumerate() {
        let args = vec![
            (
                "video_prompt".to_string(),
                ArgValue::Text(format!("a {colour} {shape} bouncing in a box")),
            ),
            (
                "audio_prompt".to_string(),
                ArgValue::Text(format!("the bounces of a {shape}")),
            ),
            ("seed".to_string(), ArgValue::Value(Value::Int(i as i64))),
            ("bridge".to_string(), ArgValue::Value(Value::Bool(bridged))),
        ];
        // Isolation guidance compares with the bridge off: it needs the bridge on.
        let mut args = args;
        if !bridged {
            args.push(("isolation".to_string(), ArgValue::Value(Value::Float(0.0))));
        }
        let report = session
            .run(
                g,
                &args,
                &RunOptions {
                    out_dir: out.clone(),
                    ..RunOptions::default()
                },
            )
            .unwrap();
        assert!(report.ok(), "{colour} {shape}: {:?}", report.failed);
        let (vs, frames, fps) = common::media_value(report.output("frames").unwrap());
        let (_, audio, rate) = common::media_value(report.output("audio").unwrap());
        let seen = visual_bounces(&vs, &frames);
        let heard = audio_onsets(&audio, rate, fps);
        let (f1, lag) = event_f1(&seen, &heard, 1);
        let p = pitch(&audio, rate);
        let named = nearest_shape(p);
        right += usize::from(named == *shape);
        eprintln!(
            "{} a {colour} {shape}: bounces {seen:?}, onsets {heard:?}, F1 {f1:.2}, pitch {p:.0} Hz ({named})",
            if bridged { "bridged" } else { "alone  " }
        );
        f1s.push(f1);
        lags.extend(lag.into_iter().map(|l| l.unsigned_abs() as f64));
    }
    lags.sort_by(f64::total_cmp);
    let median_lag = if lags.is_empty() {
        f64::INFINITY
    } else {
        lags[lags.len() / 2]
    };
    Score {
        f1: f1s.iter().sum::<f64>() / f1s.len() as f64,
        median_lag,
        pitches_right: right,
    }
}

#[test]
fn the_sound_follows_the_picture_through_the_bridge() {
    let graph = common::repo().join("graphs/text_to_sounding_video.yaml");
    let g = Graph::from_file(&graph).expect("the demo graph is valid");
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugins load");
    }
    let session = Session::new(Arc::new(rt));
    let on = score(&session, &g, true);
    let off = score(&session, &g, false);
    eprintln!(
        "bridged: F1 {:.3}, median |lag| {} frames, pitch {}/8; alone: F1 {:.3}, median |lag| {} frames, pitch {}/8",
        on.f1, on.median_lag, on.pitches_right, off.f1, off.median_lag, off.pitches_right
    );
    assert!(on.f1 >= 0.8, "bridged F1 {:.3} < 0.8", on.f1);
    assert!(on.median_lag <= 1.0, "median |lag| {}", on.median_lag);
    assert!(
        off.f1 <= on.f1 - 0.25,
        "without the bridge F1 is {:.3}, not clearly below {:.3}",
        off.f1,
        on.f1
    );
    assert!(
        on.pitches_right >= 7,
        "pitch right for {}/8",
        on.pitches_right
    );
}

#[test]
fn the_measures_score_a_drawn_clip_exactly() {
    // The measures themselves, on a clip drawn here: a 4×4-pixel square at the floor in frames
    // 2, 9 (and rising between), a 523 Hz tone starting at each of those frames.
    let (t, h, w, fps, rate) = (16usize, 16usize, 16usize, 8.0, 8000.0);
    let mut frames = vec![0.1f32; t * h * w * 3];
    let height = |f: usize| -> usize {
        let phase = ((f as f64 - 2.0) * std::f64::consts::PI / 7.0).sin().abs();
        (phase * 8.0).round() as usize
    };
    for f in 0..t {
        let top = h - 4 - height(f);
        for y in top..top + 4 {
            for x in 6..10 {
                for c in 0..3 {
                    frames[((f * h + y) * w + x) * 3 + c] = 0.9;
                }
            }
        }
    }
    assert_eq!(visual_bounces(&[t, h, w, 3], &frames), vec![2, 9]);
    let mut audio = vec![0f32; 16000];
    for onset in [2.0 / fps, 9.0 / fps] {
        for (i, s) in audio.iter_mut().enumerate() {
            let tau = i as f64 / rate - onset;
            if tau >= 0.0 {
                *s +=
                    (0.5 * (-tau / 0.07).exp() * (2.0 * std::f64::consts::PI * 523.25 * tau).sin())
                        as f32;
            }
        }
    }
    assert_eq!(audio_onsets(&audio, rate, fps), vec![2, 9]);
    assert!((pitch(&audio, rate) - 523.25).abs() < 4.0);
    assert_eq!(nearest_shape(pitch(&audio, rate)), "square");
    let (f1, lags) = event_f1(&[2, 9], &[3, 12], 1);
    assert!((f1 - 0.5).abs() < 1e-12 && lags == vec![1]);
}

/// The demo's colours, as the training script draws them.
const COLOURS: &[(&str, [f32; 3])] = &[
    ("red", [0.9, 0.15, 0.1]),
    ("green", [0.15, 0.8, 0.25]),
    ("blue", [0.2, 0.35, 1.0]),
    ("yellow", [0.95, 0.85, 0.1]),
    ("white", [0.95, 0.95, 0.95]),
    ("purple", [0.65, 0.2, 0.85]),
];

/// The named colour nearest each frame's shape: the mean of the pixels far from the clip's
/// background (each pixel's median over the clip). `frames` is `[T, H, W, 3]`.
fn shape_colours(shape: &[usize], frames: &[f32]) -> Vec<&'static str> {
    let (t, h, w) = (shape[0], shape[1], shape[2]);
    let px = h * w;
    let mut background = vec![0f32; px * 3];
    for (i, b) in background.iter_mut().enumerate() {
        let mut v: Vec<f32> = (0..t).map(|f| frames[f * px * 3 + i]).collect();
        v.sort_by(f32::total_cmp);
        *b = v[t / 2];
    }
    (0..t)
        .map(|f| {
            let mut sum = [0f32; 3];
            let mut n = 0f32;
            for p in 0..px {
                let c = &frames[(f * px + p) * 3..(f * px + p) * 3 + 3];
                let d: f32 = (0..3).map(|k| (c[k] - background[p * 3 + k]).abs()).sum();
                if d > 0.4 {
                    for k in 0..3 {
                        sum[k] += c[k];
                    }
                    n += 1.0;
                }
            }
            let mean = sum.map(|s| s / n.max(1.0));
            COLOURS
                .iter()
                .min_by(|a, b| {
                    let da: f32 = (0..3).map(|k| (a.1[k] - mean[k]).powi(2)).sum();
                    let db: f32 = (0..3).map(|k| (b.1[k] - mean[k]).powi(2)).sum();
                    da.total_cmp(&db)
                })
                .unwrap()
                .0
        })
        .collect()
}

/// Root-mean-square difference of frames `a` and `b` of two `[T, H, W, 3]` clips.
fn frame_distance(x: &[f32], a: usize, y: &[f32], b: usize, frame: usize) -> f32 {
    let (fa, fb) = (
        &x[a * frame..(a + 1) * frame],
        &y[b * frame..(b + 1) * frame],
    );
    (fa.iter().zip(fb).map(|(p, q)| (p - q).powi(2)).sum::<f32>() / frame as f32).sqrt()
}

#[test]
fn three_scenes_follow_their_prompts_and_the_extension_continues_them() {
    // graphs/sounding_scenes.yaml: scenes of 5, 5 and 6 frames captioned red, green and blue
    // (Mask²DiT's segment mask), then a fourth scene opened by their last 4 frames. Each scene's
    // frames must mostly show its own colour; the extension must open with the frames it
    // continues (exactly) and its first new frame must be as close to the last old one as the
    // scenes' own consecutive frames are, on average, to each other (within 2×).
    let graph = common::repo().join("graphs/sounding_scenes.yaml");
    let g = Graph::from_file(&graph).expect("the scenes graph is valid");
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugins load");
    }
    let session = Session::new(Arc::new(rt));
    let out = common::temp_dir("sounding_scenes");
    let report = session
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: out,
                ..RunOptions::default()
            },
        )
        .unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let (shape, scenes, _) = common::media_value(report.output("scenes").unwrap());
    let (_, fourth, _) = common::media_value(report.output("fourth").unwrap());
    let (joined_shape, _, _) = common::media_value(report.output("frames").unwrap());
    assert_eq!(joined_shape[0], 16 + 12);
    let colours = shape_colours(&shape, &scenes);
    eprintln!("scene colours by frame: {colours:?}");
    let mut start = 0;
    for (len, want) in [(5, "red"), (5, "green"), (6, "blue")] {
        let hits = colours[start..start + len]
            .iter()
            .filter(|&&c| c == want)
            .count();
        assert!(
            hits * 2 > len,
            "frames {start}..{}: {want} in {hits} of {len} ({:?})",
            start + len,
            &colours[start..start + len]
        );
        start += len;
    }
    let frame = shape[1] * shape[2] * 3;
    for k in 0..4 {
        assert!(frame_distance(&scenes, 12 + k, &fourth, k, frame) < 1e-6);
    }
    let typical = (0..15)
        .map(|t| frame_distance(&scenes, t, &scenes, t + 1, frame))
        .sum::<f32>()
        / 15.0;
    let seam = frame_distance(&scenes, 15, &fourth, 4, frame);
    eprintln!("extension seam {seam:.4}, consecutive frames {typical:.4} on average");
    assert!(seam <= 2.0 * typical, "seam {seam:.4} vs {typical:.4}");
}

#[test]
fn scene_and_extension_inputs_that_cannot_work_are_refused() {
    // An empty scene list; more context frames than the video has; context frames without a
    // context: each a node error naming the problem, before any sampling.
    let graph = common::repo().join("graphs/sounding_scenes.yaml");
    let text = std::fs::read_to_string(&graph).unwrap();
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugins load");
    }
    let session = Session::new(Arc::new(rt));
    let cases = [
        (
            text.replace(r#"prompts: ["", "", ""]"#, "prompts: []"),
            "no_scenes",
            "at least one scene",
        ),
        (
            text.replace("context_frames: 4", "context_frames: 16"),
            "fourth",
            "context_frames 16",
        ),
        (
            text.replace("video_context: first.video_latent, ", ""),
            "fourth",
            "needs a video_context",
        ),
    ];
    for (yaml, node, message) in cases {
        let g = Graph::from_yaml(&yaml, "sounding_scenes.yaml", graph.parent().unwrap()).unwrap();
        let report = session
            .run(
                &g,
                &[],
                &RunOptions {
                    out_dir: common::temp_dir("sounding_bad"),
                    ..RunOptions::default()
                },
            )
            .unwrap();
        let f = report
            .failed
            .iter()
            .find(|f| &*f.node == node)
            .unwrap_or_else(|| panic!("{node} fails: {:?}", report.failed));
        assert!(f.error.contains(message), "{node}: {}", f.error);
    }
}

#[test]
fn the_video_previews_its_frames_as_they_form() {
    // Every 5 of 20 steps SampleAudioVideo sends a node_preview event: the video tower's x₀
    // estimate, its 16 latent frames side by side (256x16; the tower works on pixels, so the
    // first three channels are the colours). The last is the finished clip: within 0.02 mean
    // absolute error of the frames (8-bit rounding and the last step's x₀ estimate against its
    // update), and closer to them than the first preview.
    let g = Graph::from_file(&common::repo().join("graphs/text_to_sounding_video.yaml")).unwrap();
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugins load");
    }
    let session = Session::new(Arc::new(rt));
    let mut opts = RunOptions {
        out_dir: common::temp_dir("sounding-previews"),
        ..RunOptions::default()
    };
    let previews = common::collect_previews(&mut opts);
    let report = session.run(&g, &[], &opts).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let previews = previews.lock().unwrap().clone();
    let steps: Vec<(u64, u64)> = previews.iter().map(|p| (p.1, p.2)).collect();
    assert_eq!(steps, [(5, 20), (10, 20), (15, 20), (20, 20)]);
    assert!(previews.iter().all(|p| p.0 == "sample"));
    let (vs, frames, _) = common::media_value(report.output("frames").unwrap());
    let [t, h, w, 3] = vs[..] else {
        panic!("frames {vs:?}")
    };
    // The frames side by side, as the preview lays them out.
    let mut strip = vec![0f32; t * h * w * 3];
    for f in 0..t {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    strip[(y * t * w + f * w + x) * 3 + c] = frames[((f * h + y) * w + x) * 3 + c];
                }
            }
        }
    }
    let mae = |i: usize| {
        let (px, pw, ph) = common::png_pixels(&common::unbase64(&previews[i].3));
        assert_eq!((pw, ph), (t * w, h));
        px.iter()
            .zip(&strip)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / strip.len() as f32
    };
    let (first, last) = (mae(0), mae(3));
    eprintln!("preview vs frames: last {last:.4}, first {first:.4} mean absolute error");
    assert!(last <= 0.02, "last preview {last:.4}");
    assert!(last < first, "the previews approach the clip as it forms");
}
