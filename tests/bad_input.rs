//! Broken and hostile graph documents through the real CLI.
//!
//! Every document in `tests/corpus/bad/` (plus the hostile ones generated below: alias bombs,
//! huge scalars, deep nesting) must be refused by `ditflow validate` with exit code 2, quickly,
//! without a panic, and with one `FILE:LINE:COL: error: MESSAGE` line per problem on stderr.
//!
//! A committed corpus file states what it expects in its leading comment:
//!
//! ```yaml
//! # expect: :7:17: error: node 'noise': unknown node type   (must occur in some error line)
//! # reject: DuplicateKeyPolicy                              (must occur in no error line)
//! # errors: 1                                               (how many error lines, when given)
//! ```
//!
//! Expectations are matched against each line after its file name (`:LINE:COL: error: ...`), so a
//! word in the file's own name never satisfies them. A message must also be whole: one cut short
//! leaves a parenthesis open. Failures of every document are collected and reported together.

mod common;

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ditflow");

/// The acceptance bound for one `ditflow validate` of a bad document.
const TIME_LIMIT: Duration = Duration::from_secs(1);

/// A command still running after this is killed (and reported), so a hang cannot stall the suite.
const KILL_AFTER: Duration = Duration::from_secs(30);

/// What one CLI invocation did.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    killed: bool,
}

/// Runs the CLI with `args` in `cwd`, timing it from spawn to exit.
fn ditflow(args: &[&str], cwd: &Path) -> Outcome {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Plugins come from where cargo built them (next to the executable, or in `deps/` on a
        // clean `cargo test`); a panic would print its usual note.
        .env("DITFLOW_PLUGIN_PATH", common::plugin_dir())
        .env_remove("DITFLOW_DEBUG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let mut killed = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > KILL_AFTER => {
                killed = true;
                let _ = child.kill();
                break child.wait().expect("wait for killed child");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("waiting for {BIN}: {e}"),
        }
    };
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out_reader.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
    Outcome {
        code: status.code(),
        stdout,
        stderr,
        elapsed,
        killed,
    }
}

/// Splits a diagnostic line `FILE:LINE:COL: error: MESSAGE` made for `file` into its location and
/// message; `None` when the line has another shape.
fn located<'a>(line: &'a str, file: &str) -> Option<(u64, u64, &'a str)> {
    let rest = line.strip_prefix(file)?.strip_prefix(':')?;
    let (line_no, rest) = rest.split_once(':')?;
    let (col, rest) = rest.split_once(':')?;
    let message = rest.strip_prefix(" error: ")?;
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((number(line_no)?, number(col)?, message))
}

/// A bad document and what its refusal must say.
struct Case {
    name: String,
    path: PathBuf,
    /// Substrings that must each occur in some error line (after its file name).
    expects: Vec<String>,
    /// Substrings that must occur in no error line.
    rejects: Vec<String>,
    /// The exact number of error lines, when known.
    errors: Option<usize>,
}

impl Case {
    /// A committed corpus file, with its expectations read from its leading comment.
    fn from_corpus(path: PathBuf) -> Case {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = String::from_utf8_lossy(&bytes);
        let mut expects = Vec::new();
        let mut rejects = Vec::new();
        let mut errors = None;
        for line in text.lines().take_while(|l| l.starts_with('#')) {
            if let Some(e) = line.strip_prefix("# expect:") {
                expects.push(e.trim().to_string());
            } else if let Some(r) = line.strip_prefix("# reject:") {
                rejects.push(r.trim().to_string());
            } else if let Some(n) = line.strip_prefix("# errors:") {
                let n = n
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: bad '# errors:' line", path.display()));
                errors = Some(n);
            }
        }
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        Case {
            name,
            path,
            expects,
            rejects,
            errors,
        }
    }

    /// Runs `ditflow validate` on the document; `Err` lists every expectation it broke.
    fn check(&self) -> Result<(), String> {
        let file = self.path.to_str().expect("UTF-8 path");
        let cwd = self.path.parent().expect("parent");
        let out = ditflow(&["validate", file], cwd);
        let mut problems: Vec<String> = Vec::new();
        if out.killed {
            problems.push(format!("still running after {KILL_AFTER:?}: killed"));
        }
        if out.code != Some(2) {
            problems.push(format!("exit code {:?}, expected 2", out.code));
        }
        if out.stderr.contains("panicked") || out.stderr.contains("RUST_BACKTRACE") {
            problems.push("the CLI panicked".to_string());
        }
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        let mut diagnostics = 0;
        for line in &lines {
            match located(line, file) {
                Some((l, c, message)) if l >= 1 && c >= 1 && !message.trim().is_empty() => {
                    diagnostics += 1;
                    if message.matches('(').count() != message.matches(')').count() {
                        problems.push(format!(
                            "message with unbalanced parentheses (cut short?): {message:?}"
                        ));
                    }
                }
                _ => problems.push(format!(
                    "line not shaped `{file}:LINE:COL: error: MESSAGE`: {line:?}"
                )),
            }
        }
        if lines.is_empty() {
            problems.push("nothing on stderr".to_string());
        }
        // What follows the file name: `:LINE:COL: error: MESSAGE`.
        let tails: Vec<&str> = lines
            .iter()
            .map(|l| l.strip_prefix(file).unwrap_or(l))
            .collect();
        if let Some(n) = self.errors {
            if diagnostics != n {
                problems.push(format!("{diagnostics} error lines, expected {n}"));
            }
        }
        for e in &self.expects {
            if !tails.iter().any(|t| t.contains(e.as_str())) {
                problems.push(format!("no error line contains {e:?}"));
            }
        }
        for r in &self.rejects {
            if let Some(t) = tails.iter().find(|t| t.contains(r.as_str())) {
                problems.push(format!(
                    "an error line contains {r:?}, which a user cannot act on: {t:?}"
                ));
            }
        }
        if out.elapsed >= TIME_LIMIT {
            problems.push(format!(
                "took {:.3} s, the limit is {:.0} s",
                out.elapsed.as_secs_f64(),
                TIME_LIMIT.as_secs_f64()
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        let mut report = format!("{}:\n", self.name);
        for p in &problems {
            let _ = writeln!(report, "  - {p}");
        }
        let _ = writeln!(
            report,
            "  command: ditflow validate {file}\n  exit: {:?}, wall time: {:.3} s",
            out.code,
            out.elapsed.as_secs_f64()
        );
        let _ = writeln!(report, "  stderr:\n{}", indent(&clip(&out.stderr)));
        if !out.stdout.trim().is_empty() {
            let _ = writeln!(report, "  stdout:\n{}", indent(&clip(&out.stdout)));
        }
        Err(report)
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 3000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    | {l}\n")).collect()
}

/// Checks every case, then fails once with all the failures.
fn check_all(cases: &[Case]) {
    let failures: Vec<String> = cases.iter().filter_map(|c| c.check().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad documents were not refused as expected:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn corpus_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/bad");
    dir.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A fresh scratch folder for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("bad_input-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Scratch(dir.canonicalize().expect("canonical scratch dir"))
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A valid graph with an Int input `seed` (declared on line 3).
const VALID_GRAPH: &str = "\
version: 1
inputs:
  seed: {type: Int, default: 0}
nodes:
  noise: {type: RandomNoise, inputs: {seed: $seed, width: 8, height: 8, channels: 3}}
  img: {type: NoiseToImage, inputs: {latent: noise.noise}}
  save: {type: SaveImage, inputs: {image: img.image, path: noise.png}}
outputs:
  image: save.path
";

/// The corpus only means something if the standard node library is found: a valid graph must
/// validate.
fn assert_node_library_found(scratch: &Scratch) {
    let path = scratch.write("valid.yaml", VALID_GRAPH);
    let out = ditflow(
        &["validate", path.to_str().expect("UTF-8 path")],
        &scratch.0,
    );
    assert_eq!(
        out.code,
        Some(0),
        "a valid graph does not validate (is the node library next to {BIN}?)\nstderr:\n{}",
        out.stderr
    );
}

#[test]
fn corpus_of_bad_documents_is_refused_with_located_errors() {
    let scratch = Scratch::new("corpus");
    assert_node_library_found(&scratch);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("read corpus dir")
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 26,
        "the corpus has only {} documents",
        paths.len()
    );
    let cases: Vec<Case> = paths.into_iter().map(Case::from_corpus).collect();
    for c in &cases {
        assert!(!c.expects.is_empty(), "{}: no '# expect:' line", c.name);
    }
    check_all(&cases);
}

/// `[[[[...]]]]`, `depth` deep.
fn nested_flow_sequences(depth: usize) -> String {
    format!(
        "version: 1\nnodes:\n  noise: {{type: RandomNoise}}\ndescription: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

/// `{a: {a: ...}}`, `depth` deep.
fn nested_flow_mappings(depth: usize) -> String {
    format!(
        "version: 1\nnodes:\n  noise: {{type: RandomNoise}}\ndescription: {}x{}\n",
        "{a: ".repeat(depth),
        "}".repeat(depth)
    )
}

/// Block mappings, each one space deeper than its parent, `depth` deep.
fn nested_block_mappings(depth: usize) -> String {
    let mut s = String::from("version: 1\nnodes:\n  noise: {type: RandomNoise}\ndescription:\n");
    for i in 0..depth {
        s.push_str(&" ".repeat(i + 1));
        s.push_str("k:\n");
    }
    s.push_str(&" ".repeat(depth + 1));
    s.push_str("x\n");
    s
}

/// `- - - - x`: compact block sequences, `depth` deep, on one line.
fn nested_block_sequences(depth: usize) -> String {
    format!(
        "version: 1\nnodes:\n  noise: {{type: RandomNoise}}\ndescription:\n  {}x\n",
        "- ".repeat(depth)
    )
}

/// "Billion laughs": `levels` anchors, each a list of `fanout` aliases of the one before.
fn alias_bomb(levels: usize, fanout: usize) -> String {
    let mut s = String::from("version: 1\nnodes:\n  noise: {type: RandomNoise}\ndescription:\n");
    let _ = writeln!(s, "  - &l0 [{}]", vec!["lol"; fanout].join(", "));
    for level in 1..levels {
        let alias = format!("*l{}", level - 1);
        let _ = writeln!(
            s,
            "  - &l{level} [{}]",
            vec![alias.as_str(); fanout].join(", ")
        );
    }
    s
}

/// A document whose `description` is one line of `len` characters.
fn huge_scalar(len: usize) -> String {
    let mut s = String::with_capacity(len + 100);
    s.push_str("version: 1\nnodes:\n  noise: {type: RandomNoise}\ndescription: ");
    s.extend(std::iter::repeat_n('x', len));
    s.push('\n');
    s
}

#[test]
fn hostile_documents_are_refused_quickly() {
    let scratch = Scratch::new("hostile");
    assert_node_library_found(&scratch);
    let case = |name: &str, text: String, expects: &[&str]| Case {
        name: name.to_string(),
        path: scratch.write(name, &text),
        expects: expects.iter().map(|e| e.to_string()).collect(),
        rejects: Vec::new(),
        errors: Some(1),
    };
    let cases = vec![
        // 9 levels of 9: 9^9 (387 million) strings if expanded.
        case(
            "alias_bomb_9x9.yaml",
            alias_bomb(9, 9),
            &[": error: the document expands to too many values for a graph (an alias bomb?)"],
        ),
        // Over the document size limit: refused before parsing, at 1:1.
        case(
            "scalar_50mb.yaml",
            huge_scalar(50_000_000),
            &[":1:1: error: graph document is 50.0 MB; the limit is 4 MB"],
        ),
        // Under the document size limit, over the parser's scalar budget.
        case(
            "scalar_3mb.yaml",
            huge_scalar(3_000_000),
            &[":4:14: error: the document's text is too large for a graph"],
        ),
        case(
            "flow_sequences_10000_deep.yaml",
            nested_flow_sequences(10_000),
            &[":4:269: error: nesting is too deep: graph documents allow 32 levels"],
        ),
        case(
            "flow_mappings_10000_deep.yaml",
            nested_flow_mappings(10_000),
            &[":4:138: error: nesting is too deep"],
        ),
        // 10,000 levels at one more space each is about 50 MB: over the size limit.
        case(
            "block_mappings_10000_deep.yaml",
            nested_block_mappings(10_000),
            &[":1:1: error: graph document is 50.0 MB; the limit is 4 MB"],
        ),
        // Deep enough to hit the parser's depth budget while under the size limit.
        case(
            "block_mappings_2500_deep.yaml",
            nested_block_mappings(2_500),
            &[":36:33: error: nesting is too deep"],
        ),
        case(
            "block_sequences_10000_deep.yaml",
            nested_block_sequences(10_000),
            &[":5:65: error: nesting is too deep"],
        ),
    ];
    check_all(&cases);
}

#[test]
fn bad_set_arguments_are_located_errors() {
    let scratch = Scratch::new("set");
    let graph = scratch.write("graph.yaml", VALID_GRAPH);
    let file = graph.to_str().expect("UTF-8 path");
    let out_dir = scratch.0.join("out");
    let out_dir = out_dir.to_str().expect("UTF-8 path");
    let seed_line = VALID_GRAPH
        .lines()
        .position(|l| l.trim_start().starts_with("seed:"))
        .expect("seed line") as u64
        + 1;
    let mut failures = Vec::new();
    // (the --set argument, substrings its one error line must contain, the line it must point at)
    let checks: [(&str, &[&str], Option<u64>); 2] = [
        ("nosuch=1", &["--set nosuch", "no input 'nosuch'"], None),
        ("seed=abc", &["--set seed", "'abc'", "Int"], Some(seed_line)),
    ];
    for (set, expects, at_line) in checks {
        let out = ditflow(&["run", file, "--set", set, "--out", out_dir], &scratch.0);
        let mut problems = Vec::new();
        if out.killed {
            problems.push("killed".to_string());
        }
        if out.code != Some(2) {
            problems.push(format!("exit code {:?}, expected 2", out.code));
        }
        if out.stderr.contains("panicked") || out.stderr.contains("RUST_BACKTRACE") {
            problems.push("the CLI panicked".to_string());
        }
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.len() != 1 {
            problems.push(format!("{} stderr lines, expected 1", lines.len()));
        }
        for line in &lines {
            match located(line, file) {
                None => problems.push(format!(
                    "line not shaped `{file}:LINE:COL: error: MESSAGE`: {line:?}"
                )),
                Some((l, _, message)) => {
                    for e in expects {
                        if !message.contains(e) {
                            problems.push(format!("message does not contain {e:?}"));
                        }
                    }
                    if at_line.is_some_and(|want| want != l) {
                        problems.push(format!(
                            "points at line {l}, expected the declaration on line {}",
                            at_line.unwrap_or(0)
                        ));
                    }
                }
            }
        }
        if out.elapsed >= TIME_LIMIT {
            problems.push(format!("took {:.3} s", out.elapsed.as_secs_f64()));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "ditflow run {file} --set {set} --out {out_dir}:\n  - {}\n  exit: {:?}\n  stderr:\n{}",
                problems.join("\n  - "),
                out.code,
                indent(&clip(&out.stderr))
            ));
        }
    }
    assert!(
        !Path::new(out_dir).join("noise.png").exists(),
        "a run with a bad --set still ran the graph"
    );
    assert!(
        failures.is_empty(),
        "bad --set arguments:\n\n{}",
        failures.join("\n")
    );
}

#[test]
fn located_parses_the_diagnostic_shape() {
    assert_eq!(
        located("/g.yaml:3:14: error: node 'a': x", "/g.yaml"),
        Some((3, 14, "node 'a': x"))
    );
    assert_eq!(located("/g.yaml:3: error: x", "/g.yaml"), None);
    assert_eq!(located("/g.yaml:x:1: error: x", "/g.yaml"), None);
    assert_eq!(located("/g.yaml:3:1: warning: x", "/g.yaml"), None);
    assert_eq!(located("error: x", "/g.yaml"), None);
    assert_eq!(located("/other.yaml:1:1: error: x", "/g.yaml"), None);
}
