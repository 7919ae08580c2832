//! Text nodes: `FormatString`, which fills `{a}`..`{d}` placeholders in a template. The template
//! language is parsed and rendered by plain functions ([`parse_template`], [`render_template`]).

use ditflow_plugin::prelude::*;

/// The inputs a `FormatString` template may name.
pub const PLACEHOLDERS: &[&str] = &["a", "b", "c", "d"];

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text copied as is (with `{{` and `}}` already turned into single braces).
    Literal(String),
    /// A `{name}` placeholder.
    Placeholder(String),
}

/// Splits `template` into literal text and `{name}` placeholders.
///
/// `{{` and `}}` stand for literal braces. An unclosed `{`, a lone `}`, and a placeholder whose
/// name is not one of [`PLACEHOLDERS`] are errors naming the offending text and its position.
pub fn parse_template(template: &str) -> Result<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = template.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                chars.next();
                literal.push('{');
            }
            '{' => {
                let rest = &template[i + 1..];
                let Some(end) = rest
                    .find(['}', '{'])
                    .filter(|&e| rest[e..].starts_with('}'))
                else {
                    bail!(
                        "unclosed '{{' at byte {i} of the template {template:?} \
                         (write '{{{{' for a literal brace)"
                    );
                };
                let name = &rest[..end];
                if !PLACEHOLDERS.contains(&name) {
                    bail!(
                        "unknown placeholder {{{name}}} in the template; \
                         the placeholders are {{a}}, {{b}}, {{c}} and {{d}} \
                         (write '{{{{' and '}}}}' for literal braces)"
                    );
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(Segment::Placeholder(name.to_string()));
                // Skip the name and the closing brace.
                for _ in 0..name.chars().count() + 1 {
                    chars.next();
                }
            }
            '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                chars.next();
                literal.push('}');
            }
            '}' => bail!(
                "unmatched '}}' at byte {i} of the template {template:?} \
                 (write '}}}}' for a literal brace)"
            ),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    Ok(segments)
}

/// Renders `template`, asking `lookup` for the text of each placeholder name it uses (once per
/// name). `lookup` returns `Ok(None)` for an input that is not connected, which is an error
/// naming the placeholder.
pub fn render_template(
    template: &str,
    mut lookup: impl FnMut(&str) -> Result<Option<String>>,
) -> Result<String> {
    let segments = parse_template(template)?;
    let mut resolved: Vec<(String, String)> = Vec::new();
    let mut out = String::with_capacity(template.len());
    for segment in &segments {
        match segment {
            Segment::Literal(text) => out.push_str(text),
            Segment::Placeholder(name) => {
                if let Some((_, text)) = resolved.iter().find(|(n, _)| n == name) {
                    out.push_str(text);
                    continue;
                }
                let Some(text) = lookup(name)? else {
                    bail!(
                        "the template uses {{{name}}} but input '{name}' is not connected \
                         (connect it or remove the placeholder)"
                    );
                };
                out.push_str(&text);
                resolved.push((name.clone(), text));
            }
        }
    }
    Ok(out)
}

/// The text of a value bound to a placeholder: strings as is, integers, floats and booleans
/// through `Display`; other kinds are an error.
fn value_text(name: &str, value: &Value) -> Result<String> {
    Ok(match value.kind() {
        Kind::String => value.as_str()?.to_string(),
        Kind::Int => value.as_int()?.to_string(),
        Kind::Float => value.as_float()?.to_string(),
        Kind::Bool => value.as_bool()?.to_string(),
        kind => bail!(
            "input '{name}' is a {kind:?}, which has no text form \
             (placeholders take a String, Int, Float or Bool)"
        ),
    })
}

/// `FormatString`: fills a template's placeholders with its inputs.
#[derive(Default)]
pub struct FormatString;

impl Node for FormatString {
    fn schema() -> NodeSchema {
        NodeSchema::new("FormatString")
            .category("text")
            .doc(
                "Fills a text template: each {a}, {b}, {c} or {d} is replaced by the text of \
                 that input (a String as is; an Int, Float or Bool written out). {{ and }} are \
                 literal braces. Naming an unconnected input, an unknown placeholder, or an \
                 unclosed brace is an error.",
            )
            .input(
                Port::new("template", "String")
                    .doc("The template, e.g. \"step {a} of {b}\"; {{ and }} are literal braces."),
            )
            .input(
                Port::new("a", "Any")
                    .optional()
                    .doc("The value for {a}: a String, Int, Float or Bool."),
            )
            .input(
                Port::new("b", "Any")
                    .optional()
                    .doc("The value for {b}: a String, Int, Float or Bool."),
            )
            .input(
                Port::new("c", "Any")
                    .optional()
                    .doc("The value for {c}: a String, Int, Float or Bool."),
            )
            .input(
                Port::new("d", "Any")
                    .optional()
                    .doc("The value for {d}: a String, Int, Float or Bool."),
            )
            .output(Port::new("text", "String").doc("The filled-in text."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let template: String = ctx.input("template")?;
        let text = render_template(&template, |name| {
            ctx.input_value(name)?
                .map(|v| value_text(name, &v))
                .transpose()
        })?;
        ctx.set_output("text", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Segment {
        Segment::Literal(s.to_string())
    }

    fn ph(s: &str) -> Segment {
        Segment::Placeholder(s.to_string())
    }

    fn render(template: &str) -> Result<String> {
        render_template(template, |name| {
            Ok(match name {
                "a" => Some("A".to_string()),
                "b" => Some("42".to_string()),
                _ => None,
            })
        })
    }

    #[test]
    fn parses_literals_and_placeholders() {
        assert_eq!(parse_template("").unwrap(), vec![]);
        assert_eq!(parse_template("plain").unwrap(), vec![lit("plain")]);
        assert_eq!(
            parse_template("x={a}, y={b}!").unwrap(),
            vec![lit("x="), ph("a"), lit(", y="), ph("b"), lit("!")]
        );
        assert_eq!(parse_template("{d}{c}").unwrap(), vec![ph("d"), ph("c")]);
    }

    #[test]
    fn doubled_braces_are_literal() {
        assert_eq!(parse_template("{{a}}").unwrap(), vec![lit("{a}")]);
        assert_eq!(
            parse_template("{{{a}}}").unwrap(),
            vec![lit("{"), ph("a"), lit("}")]
        );
        assert_eq!(render("{{}} {a}").unwrap(), "{} A");
    }

    #[test]
    fn unicode_around_placeholders() {
        assert_eq!(render("é{a}ü{b}→").unwrap(), "éAü42→");
    }

    #[test]
    fn renders_repeated_placeholders() {
        assert_eq!(render("{a}-{b}-{a}").unwrap(), "A-42-A");
    }

    #[test]
    fn unbound_placeholder_is_an_error() {
        let e = render("value {c}").unwrap_err().0;
        assert!(e.contains("{c}") && e.contains("not connected"), "{e}");
    }

    #[test]
    fn unknown_placeholder_is_an_error() {
        let e = parse_template("hi {name}").unwrap_err().0;
        assert!(e.contains("{name}") && e.contains("unknown"), "{e}");
        let e = parse_template("hi {}").unwrap_err().0;
        assert!(e.contains("{}") && e.contains("unknown"), "{e}");
        let e = parse_template("hi {A}").unwrap_err().0;
        assert!(e.contains("{A}"), "{e}");
    }

    #[test]
    fn unclosed_brace_is_an_error() {
        let e = parse_template("oops {a").unwrap_err().0;
        assert!(e.contains("unclosed") && e.contains("byte 5"), "{e}");
        let e = parse_template("oops {").unwrap_err().0;
        assert!(e.contains("unclosed"), "{e}");
        let e = parse_template("{a{b}").unwrap_err().0;
        assert!(e.contains("unclosed") && e.contains("byte 0"), "{e}");
    }

    #[test]
    fn lone_closing_brace_is_an_error() {
        let e = parse_template("a } b").unwrap_err().0;
        assert!(e.contains("unmatched") && e.contains("byte 2"), "{e}");
    }

    #[test]
    fn lookup_errors_propagate() {
        let e = render_template("{a}", |_| Err(Error::new("bad value"))).unwrap_err();
        assert_eq!(e.0, "bad value");
    }
}
