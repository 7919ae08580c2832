//! Arithmetic nodes: `Math` on floats and `IntMath` on integers with checked arithmetic. The
//! operations themselves are plain functions ([`float_op`], [`int_op`]) tested without a host.

use ditflow_plugin::prelude::*;

/// The operations `Math` accepts, in the order its `op` input lists them.
pub const FLOAT_OPS: &[&str] = &["add", "sub", "mul", "div", "pow", "min", "max"];

/// The operations `IntMath` accepts, in the order its `op` input lists them.
pub const INT_OPS: &[&str] = &["add", "sub", "mul", "div", "mod", "min", "max"];

/// Applies float operation `op` to `a` and `b`.
///
/// Division by zero, an unknown operation and a non-finite result (an overflow, `pow` of a
/// negative base with a fractional exponent, a NaN input) are errors.
pub fn float_op(op: &str, a: f64, b: f64) -> Result<f64> {
    let result = match op {
        "add" => a + b,
        "sub" => a - b,
        "mul" => a * b,
        "div" => {
            if b == 0.0 {
                bail!("division by zero ({a} / {b})");
            }
            a / b
        }
        "pow" => a.powf(b),
        "min" => a.min(b),
        "max" => a.max(b),
        _ => bail!(
            "unknown operation {op:?}; expected one of {}",
            FLOAT_OPS.join(", ")
        ),
    };
    if !result.is_finite() {
        bail!("{op}({a}, {b}) is not a finite number ({result})");
    }
    Ok(result)
}

/// Applies integer operation `op` to `a` and `b` with checked arithmetic.
///
/// `div` truncates toward zero and `mod` is the matching remainder (its sign follows `a`), as in
/// Rust and C. Overflow, division by zero and an unknown operation are errors.
pub fn int_op(op: &str, a: i64, b: i64) -> Result<i64> {
    let checked = match op {
        "add" => a.checked_add(b),
        "sub" => a.checked_sub(b),
        "mul" => a.checked_mul(b),
        "div" | "mod" if b == 0 => bail!("division by zero ({op} of {a} by {b})"),
        "div" => a.checked_div(b),
        "mod" => a.checked_rem(b),
        "min" => Some(a.min(b)),
        "max" => Some(a.max(b)),
        _ => bail!(
            "unknown operation {op:?}; expected one of {}",
            INT_OPS.join(", ")
        ),
    };
    checked.ok_or_else(|| Error(format!("{op}({a}, {b}) overflows a 64-bit integer")))
}

/// `Math`: one arithmetic operation on two floats.
#[derive(Default)]
pub struct Math;

impl Node for Math {
    fn schema() -> NodeSchema {
        NodeSchema::new("Math")
            .category("math")
            .doc(
                "Applies one arithmetic operation to two floats: a + b, a - b, a * b, a / b, \
                 a to the power b, min or max. Division by zero and a non-finite result \
                 (overflow, NaN) are errors.",
            )
            .input(
                Port::new("a", "Float")
                    .default(0.0)
                    .doc("The left operand."),
            )
            .input(
                Port::new("b", "Float")
                    .default(0.0)
                    .doc("The right operand."),
            )
            .input(
                Port::new("op", "String")
                    .default("add")
                    .choices(FLOAT_OPS)
                    .doc("The operation: add, sub, mul, div, pow (a^b), min or max."),
            )
            .output(Port::new("result", "Float").doc("The result of `a op b`."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let a: f64 = ctx.input("a")?;
        let b: f64 = ctx.input("b")?;
        let op: String = ctx.input("op")?;
        let result = float_op(&op, a, b)?;
        ctx.set_output("result", result)
    }
}

/// `IntMath`: one checked arithmetic operation on two integers.
#[derive(Default)]
pub struct IntMath;

impl Node for IntMath {
    fn schema() -> NodeSchema {
        NodeSchema::new("IntMath")
            .category("math")
            .doc(
                "Applies one checked arithmetic operation to two 64-bit integers: a + b, a - b, \
                 a * b, a / b (truncated toward zero), a mod b (remainder with the sign of a), \
                 min or max. Overflow and division by zero are errors.",
            )
            .input(Port::new("a", "Int").default(0i64).doc("The left operand."))
            .input(
                Port::new("b", "Int")
                    .default(0i64)
                    .doc("The right operand."),
            )
            .input(
                Port::new("op", "String")
                    .default("add")
                    .choices(INT_OPS)
                    .doc("The operation: add, sub, mul, div, mod, min or max."),
            )
            .output(Port::new("result", "Int").doc("The result of `a op b`."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let a: i64 = ctx.input("a")?;
        let b: i64 = ctx.input("b")?;
        let op: String = ctx.input("op")?;
        let result = int_op(&op, a, b)?;
        ctx.set_output("result", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_ops() {
        assert_eq!(float_op("add", 1.5, 2.0).unwrap(), 3.5);
        assert_eq!(float_op("sub", 1.5, 2.0).unwrap(), -0.5);
        assert_eq!(float_op("mul", 1.5, 2.0).unwrap(), 3.0);
        assert_eq!(float_op("div", 3.0, 2.0).unwrap(), 1.5);
        assert_eq!(float_op("pow", 2.0, 10.0).unwrap(), 1024.0);
        assert_eq!(float_op("min", 2.0, -1.0).unwrap(), -1.0);
        assert_eq!(float_op("max", 2.0, -1.0).unwrap(), 2.0);
    }

    #[test]
    fn float_errors() {
        assert!(float_op("div", 1.0, 0.0)
            .unwrap_err()
            .0
            .contains("division by zero"));
        assert!(float_op("div", 1.0, -0.0)
            .unwrap_err()
            .0
            .contains("division by zero"));
        assert!(float_op("pow", -8.0, 0.5)
            .unwrap_err()
            .0
            .contains("not a finite"));
        assert!(float_op("mul", 1e300, 1e300)
            .unwrap_err()
            .0
            .contains("not a finite"));
        let e = float_op("mod", 1.0, 2.0).unwrap_err().0;
        assert!(e.contains("unknown operation") && e.contains("pow"), "{e}");
    }

    #[test]
    fn int_ops() {
        assert_eq!(int_op("add", 2, 3).unwrap(), 5);
        assert_eq!(int_op("sub", 2, 3).unwrap(), -1);
        assert_eq!(int_op("mul", -4, 3).unwrap(), -12);
        assert_eq!(int_op("div", 7, 2).unwrap(), 3);
        assert_eq!(int_op("div", -7, 2).unwrap(), -3);
        assert_eq!(int_op("mod", 7, 3).unwrap(), 1);
        assert_eq!(int_op("mod", -7, 3).unwrap(), -1);
        assert_eq!(int_op("min", 7, 3).unwrap(), 3);
        assert_eq!(int_op("max", 7, 3).unwrap(), 7);
    }

    #[test]
    fn int_errors() {
        assert!(int_op("div", 1, 0)
            .unwrap_err()
            .0
            .contains("division by zero"));
        assert!(int_op("mod", 1, 0)
            .unwrap_err()
            .0
            .contains("division by zero"));
        assert!(int_op("add", i64::MAX, 1)
            .unwrap_err()
            .0
            .contains("overflows"));
        assert!(int_op("sub", i64::MIN, 1)
            .unwrap_err()
            .0
            .contains("overflows"));
        assert!(int_op("mul", i64::MAX, 2)
            .unwrap_err()
            .0
            .contains("overflows"));
        assert!(int_op("div", i64::MIN, -1)
            .unwrap_err()
            .0
            .contains("overflows"));
        assert!(int_op("mod", i64::MIN, -1)
            .unwrap_err()
            .0
            .contains("overflows"));
        assert!(int_op("pow", 2, 2)
            .unwrap_err()
            .0
            .contains("unknown operation"));
    }
}
