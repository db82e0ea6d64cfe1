//! One test (at least) per kind of rule, on records shaped like Kingdee's sales orders.

use super::output::Out;
use super::*;
use serde_json::{Map, Value, json};

fn spec(value: Value) -> TransformSpec {
    serde_json::from_value(value).unwrap()
}

fn compile(fields: Value) -> Mapping {
    Mapping::compile(&spec(
        json!({"key": "id", "version": "modified", "fields": fields}),
    ))
    .unwrap()
}

fn base_fields() -> Vec<Value> {
    vec![
        json!({"to": "id", "type": "string"}),
        json!({"to": "modified", "from": "modify_time", "type": "datetime"}),
    ]
}

fn with_base(more: Value) -> Mapping {
    let mut fields = base_fields();
    fields.extend(more.as_array().unwrap().iter().cloned());
    compile(Value::Array(fields))
}

fn order() -> Value {
    json!({
        "id": "839081161182436352",
        "bill_no": "XSDD-20200303-00004",
        "bill_status": "C",
        "bill_date": "2020-03-03",
        "modify_time": "2020-03-02 15:15:59",
        "total_amount": "20.20",
        "remark": "  ",
        "customer": {"name": " 客户A ", "number": "CUST-001"},
        "customer_number": "CUST-001",
        "material_entity": [
            {"id": "L1", "seq": 1, "qty": "2", "price": "3.10", "material_number": "M-1"},
            {"id": "L2", "seq": 2, "qty": "1", "price": "14.00", "material_number": "M-2"},
        ],
    })
}

/// What the transformer does: parse only what the rules read, then apply taking the record.
fn owned(mapping: &Mapping, source: &Value) -> Result<Applied, FieldError> {
    mapping.apply_owned(mapping.parse_source(&source.to_string()).unwrap())
}

fn one(mapping: &Mapping, source: &Value) -> Map<String, Value> {
    let mut applied = mapping.apply(source).unwrap();
    assert_eq!(owned(mapping, source).unwrap(), applied);
    assert_eq!(applied.records.len(), 1, "{applied:?}");
    tree(&applied.records.remove(0))
}

/// What [`Mapping::parse_source`] keeps of a record: the fields parsed, and the names of those
/// kept raw.
fn kept<'a>(mapping: &'a Mapping, json: &str) -> (Map<String, Value>, Vec<&'a str>) {
    mapping.source.kept(mapping.parse_source(json).unwrap())
}

/// A record's output as a JSON object.
fn tree(record: &MappedRecord) -> Map<String, Value> {
    serde_json::from_str(record.to_json().get()).unwrap()
}

#[test]
fn select_rename_and_unnest_by_path() {
    let mapping = with_base(json!([
        {"to": "number", "from": "bill_no", "type": "string"},
        {"to": "customer_name", "from": "customer.name", "type": "string"},
    ]));
    let data = one(&mapping, &order());
    assert_eq!(
        Value::Object(data),
        json!({
            "id": "839081161182436352",
            "modified": "2020-03-02T15:15:59+08:00",
            "number": "XSDD-20200303-00004",
            "customer_name": " 客户A ",
        }),
        "only the declared fields, under their new names"
    );
}

#[test]
fn nest_into_objects() {
    let mapping = with_base(json!([
        {"to": "customer.number", "from": "customer_number", "type": "string"},
        {"to": "customer.status", "from": "bill_status"},
    ]));
    let data = one(&mapping, &order());
    assert_eq!(
        data["customer"],
        json!({"number": "CUST-001", "status": "C"})
    );
    assert_eq!(
        mapping.output_fields().collect::<Vec<_>>(),
        ["id", "modified", "customer"]
    );
}

#[test]
fn entry_lines_kept_nested_and_mapped() {
    let mapping = with_base(json!([
        {"to": "lines", "from": "material_entity", "fields": [
            {"to": "line_id", "from": "id", "type": "string"},
            {"to": "qty", "type": "decimal"},
            {"to": "material.number", "from": "material_number"},
        ]},
    ]));
    let data = one(&mapping, &order());
    assert_eq!(
        data["lines"],
        json!([
            {"line_id": "L1", "qty": "2", "material": {"number": "M-1"}},
            {"line_id": "L2", "qty": "1", "material": {"number": "M-2"}},
        ])
    );
    let mut bad = order();
    bad["material_entity"][1]["qty"] = json!("two");
    let err = mapping.apply(&bad).unwrap_err();
    assert_eq!(err.field, "lines[1].qty");
}

fn lines_mapping(filter: Option<&str>) -> Mapping {
    let mut value = json!({
        "key": "line_id",
        "version": "modified",
        "flatten": {"path": "material_entity", "as": "line"},
        "fields": [
            {"to": "line_id", "from": "line.id", "type": "string"},
            {"to": "order_id", "from": "id", "type": "string"},
            {"to": "modified", "from": "modify_time", "type": "datetime"},
            {"to": "seq", "from": "line.seq", "type": "integer"},
            {"to": "qty", "from": "line.qty", "type": "decimal"},
            {"to": "price", "from": "line.price", "type": "decimal"},
            {"to": "amount", "expr": "qty * price", "type": "decimal"},
        ],
    });
    if let Some(filter) = filter {
        value["filter"] = json!(filter);
    }
    Mapping::compile(&spec(value)).unwrap()
}

#[test]
fn flatten_lines_with_parent_fields() {
    let applied = lines_mapping(None).apply(&order()).unwrap();
    assert_eq!(owned(&lines_mapping(None), &order()).unwrap(), applied);
    assert_eq!(applied.filtered, 0);
    let ids: Vec<&str> = applied.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["L1", "L2"], "the line id is the key");
    for record in &applied.records {
        assert_eq!(tree(record)["order_id"], json!("839081161182436352"));
        assert_eq!(
            record.version.to_rfc3339(),
            "2020-03-02T15:15:59+08:00",
            "the version is the parent's modify time"
        );
    }
    assert_eq!(tree(&applied.records[0])["amount"], json!("6.2"));
    assert_eq!(tree(&applied.records[1])["seq"], json!(2));

    let mut empty = order();
    empty["material_entity"] = json!([]);
    let applied = lines_mapping(None).apply(&empty).unwrap();
    assert!(applied.records.is_empty());
    assert_eq!(
        applied.filtered, 1,
        "an order without lines is counted, not lost"
    );

    let mut bad = order();
    bad["material_entity"][1]["price"] = json!("N/A");
    let err = lines_mapping(None).apply(&bad).unwrap_err();
    assert_eq!(err.field, "price");
    assert!(err.reason.contains("line 2"), "{err}");
}

#[test]
fn type_conversions() {
    let mapping = with_base(json!([
        {"to": "total", "from": "total_amount", "type": "decimal"},
        {"to": "seq", "from": "material_entity", "type": "json"},
        {"to": "active", "from": "flag", "type": "boolean"},
        {"to": "count", "type": "integer"},
        {"to": "bill_date", "type": "date", "format": "%m/%d/%Y"},
        {"to": "modified_ms", "from": "modify_time", "type": "datetime", "format": "epoch_millis"},
        {"to": "modified_utc", "from": "modify_time", "type": "datetime", "timezone": "UTC"},
        {"to": "due", "type": "date", "input_format": "%d.%m.%Y"},
    ]));
    let mut source = order();
    source["flag"] = json!("0");
    source["count"] = json!("12");
    source["due"] = json!("31.03.2020");
    let data = one(&mapping, &source);
    assert_eq!(data["total"], json!("20.20"));
    assert_eq!(data["active"], json!(false));
    assert_eq!(data["count"], json!(12));
    assert_eq!(data["bill_date"], json!("03/03/2020"));
    assert_eq!(data["modified_ms"], json!(1_583_133_359_000_i64));
    assert_eq!(data["modified_utc"], json!("2020-03-02T07:15:59+00:00"));
    assert_eq!(data["due"], json!("2020-03-31"));
}

#[test]
fn cleaning_trim_empty_defaults_and_value_maps() {
    let mapping = with_base(json!([
        {"to": "customer", "from": "customer.name", "type": "string", "trim": true},
        {"to": "remark", "type": "string", "trim": true, "empty_as_null": true},
        {"to": "note", "from": "remark", "trim": true, "empty_as_null": true, "default": "none"},
        {"to": "channel", "default": "erp"},
        {"to": "status", "from": "bill_status", "map": {"C": "audited", "Z": "draft"}},
        {"to": "helper", "from": "bill_no", "drop": true},
    ]));
    let data = one(&mapping, &order());
    assert_eq!(data["customer"], json!("客户A"));
    assert_eq!(data["remark"], Value::Null);
    assert_eq!(data["note"], json!("none"));
    assert_eq!(data["channel"], json!("erp"));
    assert_eq!(data["status"], json!("audited"));
    assert!(
        !data.contains_key("helper"),
        "dropped fields are not written"
    );
    assert!(!mapping.output_fields().any(|name| name == "helper"));

    let strict = with_base(json!([
        {"to": "status", "from": "bill_status", "map": {"Z": "draft"}, "unmapped": "error"},
    ]));
    let err = strict.apply(&order()).unwrap_err();
    assert_eq!(err.field, "status");
}

#[test]
fn required_fields() {
    let mapping = with_base(json!([
        {"to": "remark", "trim": true, "empty_as_null": true, "required": true},
    ]));
    let err = mapping.apply(&order()).unwrap_err();
    assert_eq!(err.field, "remark");
    assert!(err.reason.contains("required"), "{err}");
    // The key and the version are always required.
    let err = mapping
        .apply(&json!({"modify_time": "2020-03-02 15:15:59"}))
        .unwrap_err();
    assert_eq!(err.field, "id");
}

#[test]
fn computed_fields_concatenate_compute_and_decide() {
    let mapping = with_base(json!([
        {"to": "total", "from": "total_amount", "type": "decimal"},
        {"to": "bill_no", "type": "string"},
        {"to": "label", "expr": "bill_no + \" / \" + total"},
        {"to": "with_tax", "expr": "total * 1.13", "type": "decimal"},
        {"to": "size", "expr": "if total > 100 { \"large\" } else { \"small\" }"},
    ]));
    let data = one(&mapping, &order());
    assert_eq!(data["label"], json!("XSDD-20200303-00004 / 20.20"));
    assert_eq!(data["with_tax"], json!("22.826"), "exact: 20.20 × 1.13");
    assert_eq!(data["size"], json!("small"));
}

#[test]
fn filters_skip_records_and_count_them() {
    let mapping = lines_mapping(Some("qty > 1"));
    let applied = mapping.apply(&order()).unwrap();
    assert_eq!(applied.records.len(), 1);
    assert_eq!(applied.records[0].id, "L1");
    assert_eq!(applied.filtered, 1);

    let orders = Mapping::compile(&spec(json!({
        "key": "id", "version": "modified", "filter": "status == \"audited\"",
        "fields": [
            {"to": "id", "type": "string"},
            {"to": "modified", "from": "modify_time", "type": "datetime"},
            {"to": "status", "from": "bill_status", "map": {"C": "audited"}, "drop": true},
        ],
    })))
    .unwrap();
    assert_eq!(orders.apply(&order()).unwrap().records.len(), 1);
    let mut draft = order();
    draft["bill_status"] = json!("Z");
    let applied = orders.apply(&draft).unwrap();
    assert!(applied.records.is_empty());
    assert_eq!(applied.filtered, 1);
}

#[test]
fn bad_values_name_the_field_not_the_value() {
    let mapping = with_base(json!([{"to": "total", "from": "total_amount", "type": "decimal"}]));
    let mut source = order();
    source["total_amount"] = json!("12,5 secret");
    let err = mapping.apply(&source).unwrap_err();
    assert_eq!(err.field, "total");
    assert!(!err.to_string().contains("secret"), "{err}");
    let mut source = order();
    source["modify_time"] = json!("secret 12:00");
    let err = mapping.apply(&source).unwrap_err();
    assert_eq!(err.field, "modified");
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[test]
fn compile_errors_name_the_rule_and_the_problem() {
    let check = |value: Value, field: &str, words: &str| {
        let err = Mapping::compile(&spec(value)).unwrap_err();
        assert_eq!(err.field, field, "{err:?}");
        assert!(err.problem.contains(words), "{err:?}");
    };
    let fields = |more: Value| {
        let mut all = base_fields();
        all.extend(more.as_array().unwrap().iter().cloned());
        json!({"key": "id", "version": "modified", "fields": all})
    };
    check(
        json!({"key": "id", "version": "modified", "fields": [{"to": "id", "type": "string"}]}),
        "transform.version",
        "not one of the output fields",
    );
    check(
        fields(json!([{"to": "id"}])),
        "transform.fields[2].to",
        "twice",
    );
    check(
        fields(json!([{"to": "x", "expr": "nope + 1"}])),
        "transform.fields[2].expr",
        "nope",
    );
    check(
        fields(json!([{"to": "x", "expr": "1 +"}])),
        "transform.fields[2].expr",
        "",
    );
    // A filter that is a value, not a condition.
    let mut filtered = fields(json!([{"to": "bill_no", "type": "string"}]));
    filtered["filter"] = json!("bill_no");
    check(
        filtered.clone(),
        "transform.filter",
        "filter gave a string, not true or false",
    );
    filtered["filter"] = json!("bill_no != \"\"");
    Mapping::compile(&spec(filtered)).expect("a condition passes");
    check(
        fields(json!([{"to": "x", "from": "a", "expr": "1"}])),
        "transform.fields[2].expr",
        "either",
    );
    check(
        fields(json!([{"to": "x", "type": "date", "format": "%Q"}])),
        "transform.fields[2].format",
        "strftime",
    );
    check(
        fields(json!([{"to": "x", "type": "string", "format": "%Y"}])),
        "transform.fields[2].format",
        "datetime and date",
    );
    check(
        fields(json!([{"to": "x", "type": "datetime", "timezone": "Mars/Base"}])),
        "transform.fields[2].timezone",
        "time zone",
    );
    check(
        fields(json!([{"to": "x", "unmapped": "error"}])),
        "transform.fields[2].unmapped",
        "map",
    );
    check(
        fields(json!([{"to": "x", "fields": [{"to": "y", "expr": "1"}]}])),
        "transform.fields[2].fields[0].expr",
        "top level",
    );
    check(
        fields(json!([{"to": "x..y"}])),
        "transform.fields[2].to",
        "dotted",
    );
    let mut with_filter = fields(json!([]));
    with_filter["filter"] = json!("unknown_field == 1");
    check(with_filter, "transform.filter", "unknown_field");
    let mut flatten = fields(json!([]));
    flatten["flatten"] = json!({"path": "material_entity", "as": "a.b"});
    check(flatten, "transform.flatten.as", "plain name");
    check(
        json!({"key": "id", "version": "modified", "fields": [
            {"to": "id", "type": "string"},
            {"to": "modified", "from": "modify_time", "type": "datetime", "format": "%Y"},
        ]}),
        "transform.version",
        "rfc3339",
    );
}

#[test]
fn records_are_parsed_for_the_fields_read_and_fields_one_rule_reads_are_taken_or_kept_raw() {
    let mapping = with_base(json!([
        {"to": "customer_name", "from": "customer.name", "type": "string", "trim": true},
        {"to": "customer_number", "from": "customer.number", "type": "string"},
        {"to": "lines", "from": "material_entity"},
        {"to": "amount", "from": "total_amount", "type": "decimal"},
        {"to": "again", "from": "total_amount", "type": "string"},
    ]));
    let (parsed, raw) = kept(&mapping, &order().to_string());
    let read: Vec<&String> = parsed.keys().collect();
    assert_eq!(read, ["customer", "id", "modify_time", "total_amount"]);
    assert_eq!(raw, ["material_entity"], "passed on unchanged: kept raw");
    let applied = one(&mapping, &order());
    assert_eq!(applied["lines"], order()["material_entity"]);
    let record = owned(&mapping, &order()).unwrap().records.remove(0);
    let passed: Vec<&str> = record
        .values
        .iter()
        .filter_map(|value| match value {
            Out::Raw(json) => Some(json.get()),
            _ => None,
        })
        .collect();
    assert_eq!(
        passed,
        [order()["material_entity"].to_string()],
        "the lines travel as raw JSON"
    );
    assert_eq!(applied["customer_name"], json!("客户A"));
    assert_eq!(
        (&applied["amount"], &applied["again"]),
        (&json!("20.20"), &json!("20.20"))
    );
    // Failures and records that are not objects come out the same either way.
    let mut bad = order();
    bad["total_amount"] = json!("many");
    assert_eq!(
        owned(&mapping, &bad).unwrap_err(),
        mapping.apply(&bad).unwrap_err()
    );
    assert_eq!(
        owned(&mapping, &json!([1])).unwrap_err(),
        mapping.apply(&json!([1])).unwrap_err()
    );
    let duplicate = r#"{"id":"1","id":"2","modify_time":"2020-03-02 15:15:59","skipped":{"deep":[1,{"x":"\u0041"}]}}"#;
    let applied = mapping
        .apply_owned(mapping.parse_source(duplicate).unwrap())
        .unwrap();
    assert_eq!(
        applied.records[0].id, "2",
        "the last of repeated keys, as in a tree"
    );
    assert!(mapping.parse_source(r#"{"id":"1"} trailing"#).is_err());
}

#[test]
fn entry_lines_are_parsed_for_the_fields_their_rules_read() {
    let kept = |mapping: &Mapping, source: &str| -> Value {
        kept(mapping, source).0["material_entity"].clone()
    };
    let nested = with_base(json!([
        {"to": "lines", "from": "material_entity", "fields": [
            {"to": "line_id", "from": "id", "type": "string"},
            {"to": "material", "from": "material.number", "type": "string"},
        ]},
    ]));
    let source = r#"{"id":"1","modify_time":"2020-03-02 15:15:59","material_entity":[
        {"id":"L1","qty":"2","material":{"number":"M-1","name":"x"},"skip":[1,{"a":"\u0041"}]},
        {"id":"L2","id":"L3"},
        7
    ]}"#;
    assert_eq!(
        kept(&nested, source),
        json!([{"id": "L1", "material": {"number": "M-1"}}, {"id": "L3"}, 7]),
        "only the fields the line rules read, the last of repeated keys, other values whole"
    );
    let source: Value = serde_json::from_str(source).unwrap();
    let mut source_without_the_number = source.clone();
    source_without_the_number["material_entity"][2] = json!({"id": "L4"});
    for record in [&order(), &source_without_the_number] {
        one(&nested, record);
    }
    assert_eq!(
        owned(&nested, &source).unwrap(),
        nested.apply(&source).unwrap(),
        "a line that is not an object maps the same either way"
    );

    let flattened = lines_mapping(None);
    assert_eq!(
        kept(&flattened, &order().to_string()),
        json!([
            {"id": "L1", "seq": 1, "qty": "2", "price": "3.10"},
            {"id": "L2", "seq": 2, "qty": "1", "price": "14.00"},
        ]),
        "flattened lines: the fields read through the alias"
    );
    let whole = with_base(json!([
        {"to": "lines", "from": "material_entity", "fields": [{"to": "id", "type": "string"}]},
        {"to": "first", "from": "material_entity", "type": "json", "drop": true},
    ]));
    assert_eq!(
        kept(&whole, &order().to_string()),
        order()["material_entity"],
        "a rule that reads the lines whole gets them whole"
    );
    assert!(
        nested
            .parse_source(r#"{"id":"1","material_entity":[{"id":"L1","skip":[1,]}]}"#)
            .is_err(),
        "skipped parts of lines are still checked to be JSON"
    );
}

#[test]
fn output_fields_are_written_in_the_order_declared_and_nested_by_dotted_names() {
    let mapping = with_base(json!([
        {"to": "customer.number", "from": "customer_number", "type": "string"},
        {"to": "total", "from": "total_amount", "type": "decimal"},
        {"to": "customer.name", "from": "customer.name", "type": "string", "trim": true},
        {"to": "status", "from": "bill_status", "drop": true},
        {"to": "lines", "from": "material_entity", "fields": [
            {"to": "qty", "type": "decimal"},
            {"to": "material.number", "from": "material_number"},
        ]},
    ]));
    let json = mapping.apply(&order()).unwrap().records[0].to_json();
    assert_eq!(
        json.get(),
        r#"{"id":"839081161182436352","modified":"2020-03-02T15:15:59+08:00","customer":{"number":"CUST-001","name":"客户A"},"total":"20.20","lines":[{"qty":"2","material":{"number":"M-1"}},{"qty":"1","material":{"number":"M-2"}}]}"#
    );
    assert_eq!(
        mapping.output_fields().collect::<Vec<_>>(),
        ["id", "modified", "customer", "total", "lines"]
    );
    let clash = Mapping::compile(&spec(
        json!({"key": "id", "version": "modified", "fields": [
            {"to": "id", "type": "string"},
            {"to": "modified", "from": "modify_time", "type": "datetime"},
            {"to": "a.b", "from": "bill_no"},
            {"to": "a.b.c", "from": "bill_no"},
        ]}),
    ))
    .unwrap_err();
    assert_eq!(clash.field, "transform.fields[3].to");
    assert!(
        clash.problem.contains("both a field and an object"),
        "{clash:?}"
    );
}
