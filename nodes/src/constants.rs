//! Constant nodes (`Int`, `Float`, `Bool`, `String`): each passes its `value` input through, so a
//! graph can name a literal once and wire it into several nodes.

use ditflow_plugin::prelude::*;

/// `Int`: an integer constant.
#[derive(Default)]
pub struct IntConstant;

impl Node for IntConstant {
    fn schema() -> NodeSchema {
        NodeSchema::new("Int")
            .category("constants")
            .doc("An integer constant: outputs its `value` input unchanged.")
            .input(
                Port::new("value", "Int")
                    .default(0i64)
                    .doc("The integer to output."),
            )
            .output(Port::new("value", "Int").doc("The same integer."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let value: i64 = ctx.input("value")?;
        ctx.set_output("value", value)
    }
}

/// `Float`: a floating-point constant.
#[derive(Default)]
pub struct FloatConstant;

impl Node for FloatConstant {
    fn schema() -> NodeSchema {
        NodeSchema::new("Float")
            .category("constants")
            .doc("A floating-point constant: outputs its `value` input unchanged.")
            .input(
                Port::new("value", "Float")
                    .default(0.0)
                    .doc("The number to output."),
            )
            .output(Port::new("value", "Float").doc("The same number."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let value: f64 = ctx.input("value")?;
        ctx.set_output("value", value)
    }
}

/// `Bool`: a boolean constant.
#[derive(Default)]
pub struct BoolConstant;

impl Node for BoolConstant {
    fn schema() -> NodeSchema {
        NodeSchema::new("Bool")
            .category("constants")
            .doc("A boolean constant: outputs its `value` input unchanged.")
            .input(
                Port::new("value", "Bool")
                    .default(false)
                    .doc("The boolean to output."),
            )
            .output(Port::new("value", "Bool").doc("The same boolean."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let value: bool = ctx.input("value")?;
        ctx.set_output("value", value)
    }
}

/// `String`: a text constant.
#[derive(Default)]
pub struct StringConstant;

impl Node for StringConstant {
    fn schema() -> NodeSchema {
        NodeSchema::new("String")
            .category("constants")
            .doc("A text constant: outputs its `value` input unchanged.")
            .input(
                Port::new("value", "String")
                    .default("")
                    .doc("The text to output."),
            )
            .output(Port::new("value", "String").doc("The same text."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let value: String = ctx.input("value")?;
        ctx.set_output("value", value)
    }
}
