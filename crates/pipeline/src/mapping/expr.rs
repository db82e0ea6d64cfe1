//! Computed fields and filters: small expressions in Rhai, compiled when the pipeline file loads.
//!
//! Rhai is sandboxed (no I/O, bounded operations), and built here without floats and with exact
//! decimals: `qty * price` on money is computed in `rust_decimal`, and a literal like `0.13` is a
//! decimal too. An expression sees the output fields declared before it, by their names.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use rhai::{AST, Dynamic, Engine, EvalAltResult, Scope};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::convert::FieldType;

/// One compiled expression and the fields it reads.
#[derive(Debug, Clone)]
pub struct Expression {
    ast: Arc<AST>,
    /// The output fields the expression may read, with their types (to hand them over as numbers).
    inputs: Vec<(String, FieldType)>,
}

/// The shared engine: standard functions, strict variables (an unknown name fails at load), limits.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut engine = Engine::new();
        // `eval` would run a string as a script: statements the expression grammar refuses.
        engine.disable_symbol("eval");
        engine
            .set_strict_variables(true)
            .set_max_operations(100_000)
            .set_max_expr_depths(64)
            .set_max_string_size(1 << 20)
            .set_max_array_size(100_000);
        engine
    })
}

impl Expression {
    /// Compiles `text`, which may read the fields in `available` (name and type, in output order).
    pub fn compile(text: &str, available: &[(String, FieldType)]) -> Result<Self, String> {
        let names = identifiers(text);
        let inputs: Vec<(String, FieldType)> = available
            .iter()
            .filter(|(name, _)| names.contains(name.as_str()))
            .cloned()
            .collect();
        let mut scope = Scope::new();
        for (name, _) in &inputs {
            scope.push_dynamic(name.as_str(), Dynamic::UNIT);
        }
        let ast = engine()
            .compile_expression_with_scope(&scope, text)
            .map_err(|err| {
                format!("{err} (an expression can read the fields declared before it)")
            })?;
        Ok(Self {
            ast: Arc::new(ast),
            inputs,
        })
    }

    /// Evaluates the expression over the output fields produced so far.
    pub fn eval(&self, fields: &impl Fields) -> Result<Value, String> {
        thread_local! {
            // Reused between records: a fresh scope per record costs more than the evaluation.
            static SCOPE: RefCell<Scope<'static>> = RefCell::new(Scope::new());
        }
        let result = SCOPE.with_borrow_mut(|scope| {
            scope.clear();
            for (name, kind) in &self.inputs {
                let value = fields.field(name);
                let value = value.as_deref().unwrap_or(&Value::Null);
                scope.push_dynamic(name.as_str(), to_dynamic(value, *kind));
            }
            engine().eval_ast_with_scope::<Dynamic>(scope, &self.ast)
        });
        from_dynamic(result.map_err(|err| format!("expression failed: {}", describe(&err)))?)
    }

    /// Refuses a filter that, for a record with a typical value in each field it reads, gives
    /// something other than true or false (`filter = 'bill_no'`: a string). A filter that fails on
    /// those values proves nothing and passes: it is checked on every record anyway.
    pub fn check_gives_a_boolean(&self) -> Result<(), String> {
        let sample: Map<String, Value> = self
            .inputs
            .iter()
            .map(|(name, kind)| {
                let value = match kind {
                    FieldType::String | FieldType::Json => Value::from("text"),
                    FieldType::Integer => Value::from(1),
                    FieldType::Decimal => Value::from("1.5"),
                    FieldType::Boolean => Value::from(true),
                    FieldType::Datetime => Value::from("2025-01-01T00:00:00+08:00"),
                    FieldType::Date => Value::from("2025-01-01"),
                };
                (name.clone(), value)
            })
            .collect();
        match self.eval(&sample) {
            Ok(Value::Bool(_)) | Err(_) => Ok(()),
            Ok(other) => Err(format!(
                "filter gave {}, not true or false (for a record like {}): a filter must be a condition, e.g. `bill_no != \"\"`",
                conveyor_base::source_time::kind_of(&other),
                Value::Object(sample)
            )),
        }
    }

    /// Evaluates a filter: true keeps the record.
    pub fn keep(&self, fields: &impl Fields) -> Result<bool, String> {
        match self.eval(fields)? {
            Value::Bool(keep) => Ok(keep),
            other => Err(format!(
                "filter gave {}, not true or false",
                conveyor_base::source_time::kind_of(&other)
            )),
        }
    }
}

/// The fields an expression reads, by name.
pub trait Fields {
    fn field(&self, name: &str) -> Option<Cow<'_, Value>>;
}

impl Fields for Map<String, Value> {
    fn field(&self, name: &str) -> Option<Cow<'_, Value>> {
        self.get(name).map(Cow::Borrowed)
    }
}

/// A run-time error without the values Rhai puts into some messages (`Division by zero: 20.20 / 0`).
fn describe(error: &EvalAltResult) -> String {
    match error {
        EvalAltResult::ErrorArithmetic(_, at) => {
            format!("arithmetic error (division by zero or overflow) at {at}")
        }
        EvalAltResult::ErrorRuntime(_, at) => format!("runtime error at {at}"),
        other => other.to_string(),
    }
}

/// Identifier-like words of an expression: a superset of the variables it reads (words in string
/// literals included, which is harmless).
fn identifiers(text: &str) -> BTreeSet<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|word| word.chars().next().is_some_and(|c| !c.is_ascii_digit()))
        .collect()
}

/// A field's value as Rhai sees it: decimals and numeric JSON as exact decimals, whole numbers as
/// integers, text as strings, null as `()`.
fn to_dynamic(value: &Value, kind: FieldType) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(flag) => Dynamic::from_bool(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(whole) if kind != FieldType::Decimal => Dynamic::from_int(whole),
            _ => Decimal::from_str(&number.to_string())
                .or_else(|_| Decimal::from_scientific(&number.to_string()))
                .map_or(Dynamic::UNIT, Dynamic::from_decimal),
        },
        Value::String(text) if kind == FieldType::Decimal => Decimal::from_str(text)
            .map(Dynamic::from_decimal)
            .unwrap_or_else(|_| Dynamic::from(text.clone())),
        Value::String(text) => Dynamic::from(text.clone()),
        Value::Array(items) => Dynamic::from_array(
            items
                .iter()
                .map(|item| to_dynamic(item, FieldType::Json))
                .collect(),
        ),
        Value::Object(_) => Dynamic::UNIT,
    }
}

/// An expression's result as JSON: decimals become exact decimal text.
fn from_dynamic(value: Dynamic) -> Result<Value, String> {
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(flag) = value.as_bool() {
        return Ok(Value::Bool(flag));
    }
    if let Ok(whole) = value.as_int() {
        return Ok(Value::from(whole));
    }
    if let Ok(decimal) = value.as_decimal() {
        return Ok(Value::String(decimal.normalize().to_string()));
    }
    if value.is_string() {
        return Ok(Value::String(value.into_string().unwrap_or_default()));
    }
    if value.is_array() {
        let items = value.into_array().unwrap_or_default();
        return items.into_iter().map(from_dynamic).collect();
    }
    Err(format!("expression gave a {}", value.type_name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> Vec<(String, FieldType)> {
        [
            ("qty", FieldType::Decimal),
            ("price", FieldType::Decimal),
            ("bill_no", FieldType::String),
            ("seq", FieldType::Integer),
        ]
        .map(|(name, kind)| (name.to_owned(), kind))
        .to_vec()
    }

    fn record() -> Map<String, Value> {
        json!({"qty": "3", "price": "0.10", "bill_no": "XSDD-1", "seq": 2})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn arithmetic_on_money_is_exact() {
        let expr = Expression::compile("qty * price + 0.2", &fields()).unwrap();
        // 3 × 0.10 + 0.2 is 0.5 exactly; through floats it would be 0.5000000000000001.
        assert_eq!(expr.eval(&record()).unwrap(), json!("0.5"));
    }

    #[test]
    fn concatenation_and_conditions() {
        let expr = Expression::compile(r#"bill_no + "-" + seq"#, &fields()).unwrap();
        assert_eq!(expr.eval(&record()).unwrap(), json!("XSDD-1-2"));
        let expr =
            Expression::compile(r#"if qty > 2 { "bulk" } else { "single" }"#, &fields()).unwrap();
        assert_eq!(expr.eval(&record()).unwrap(), json!("bulk"));
        let filter = Expression::compile("seq >= 3", &fields()).unwrap();
        assert!(!filter.keep(&record()).unwrap());
    }

    #[test]
    fn unknown_names_and_bad_syntax_fail_at_compile_time() {
        let err = Expression::compile("qty * cost", &fields()).unwrap_err();
        assert!(err.contains("cost"), "{err}");
        assert!(Expression::compile("qty *", &fields()).is_err());
        // A string run as a script would escape the grammar: refused before any record.
        let err = Expression::compile(r#"eval("let x = qty; x * 2")"#, &fields()).unwrap_err();
        assert!(err.contains("eval"), "{err}");
    }

    #[test]
    fn runtime_errors_are_reported_not_panicked() {
        let expr = Expression::compile("bill_no * 2", &fields()).unwrap();
        assert!(expr.eval(&record()).is_err());
        let expr = Expression::compile("price / (qty - 3)", &fields()).unwrap();
        let err = expr.eval(&record()).unwrap_err();
        assert!(
            err.contains("division by zero") && !err.contains("0.10"),
            "{err}"
        );
        let filter = Expression::compile("qty", &fields()).unwrap();
        assert!(filter.keep(&record()).is_err());
    }
}
