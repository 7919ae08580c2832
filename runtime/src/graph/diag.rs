//! Diagnostics: one problem in a graph, printed as `FILE:LINE:COL: error: MESSAGE`.

use super::ir::Loc;

/// One problem, located in a graph source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub loc: Loc,
    /// The node the problem belongs to, where one applies.
    pub node: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(file: &str, loc: Loc, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.to_string(),
            loc,
            node: None,
            message: message.into(),
        }
    }

    pub fn at_node(file: &str, loc: Loc, node: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.to_string(),
            loc,
            node: Some(node.to_string()),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loc = if self.loc.line == 0 {
            Loc::START
        } else {
            self.loc
        };
        write!(f, "{}:{}:{}: error: ", self.file, loc.line, loc.col)?;
        if let Some(node) = &self.node {
            write!(f, "node '{node}': ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a graph, in source order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn sorted(mut self) -> Diagnostics {
        self.0.sort_by_key(|d| d.loc);
        self
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The closest candidates to `word` by edit distance, best first (for "did you mean").
pub fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    max: usize,
) -> Vec<&'a str> {
    let lower = word.to_lowercase();
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| {
            let cl = c.to_lowercase();
            // A prefix either way (`Integer` for `Int`) is a near miss whatever the distance.
            let prefix = cl.len() >= 3
                && lower.len() >= 3
                && (lower.starts_with(&cl) || cl.starts_with(&lower));
            let d = edit_distance(&lower, &cl);
            (if prefix { d.min(1) } else { d }, c)
        })
        .filter(|&(d, c)| d <= (c.chars().count().max(word.chars().count()) / 3).max(1) + 1)
        .collect();
    scored.sort();
    scored.into_iter().take(max).map(|(_, c)| c).collect()
}

/// ` (did you mean 'a' or 'b'?)`, or nothing.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best = closest(word, candidates, 3);
    match best.as_slice() {
        [] => String::new(),
        [one] => format!(" (did you mean '{one}'?)"),
        many => {
            let quoted: Vec<String> = many.iter().map(|c| format!("'{c}'")).collect();
            format!(" (did you mean {}?)", quoted.join(" or "))
        }
    }
}

/// Levenshtein distance over chars, with an early cap for long inputs.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(256).collect();
    let b: Vec<char> = b.chars().take(256).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            did_you_mean("nodez", ["nodes", "inputs", "outputs"]),
            " (did you mean 'nodes'?)"
        );
        assert_eq!(did_you_mean("zzzzzz", ["nodes"]), "");
        assert_eq!(
            did_you_mean("Integer", ["Int", "Float"]),
            " (did you mean 'Int'?)"
        );
        assert_eq!(
            closest("TextEncod", ["TextEncode", "TextDecode", "Noise"], 3)[0],
            "TextEncode"
        );
    }

    #[test]
    fn display_shape() {
        let d = Diagnostic::at_node("g.yaml", Loc::new(3, 5), "pos", "unknown input 'txt'");
        assert_eq!(
            d.to_string(),
            "g.yaml:3:5: error: node 'pos': unknown input 'txt'"
        );
    }
}
