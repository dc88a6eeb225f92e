//! The language's behaviour, operator by operator, its errors and limits, and the fuzz
//! targets (`fuzz_*`, run at length by ci/fuzz.sh).

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Map, Value, json};

use crate::{Filter, FilterError, Limits, Projection, Reason, RecordView};

/// An envelope as the consumer writes it, parsed.
fn envelope(value: Value) -> Value {
    let mut envelope = json!({
        "topic": "orders",
        "partition": 3,
        "offset": 1042,
        "key": "order-17",
        "timestamp": 1_764_000_000_000_i64,
        "headers": {"source": "web", "trace": ["a", "b"], "x-tenant": "acme"},
    });
    envelope["value"] = value;
    envelope
}

fn order() -> Value {
    json!({
        "id": "order-17",
        "status": "placed",
        "total_cents": 1250,
        "rate": 0.5,
        "paid": true,
        "note": null,
        "tags": ["vip", "late"],
        "customer": {"name": "Ada", "city": "Zürich", "address": {"zip": "8001"}},
        "items": [{"sku": "a-1", "qty": 2}, {"sku": "b-2", "qty": 1}],
        "odd key": "yes",
        "big": 18_446_744_073_709_551_615_u64,
        "negative": -9_223_372_036_854_775_808_i64,
    })
}

/// Whether `source` compiles with the default limits and matches `envelope`.
fn matches_envelope(source: &str, envelope: &Value) -> bool {
    let filter = match Filter::compile(source, &Limits::default()) {
        Ok(filter) => filter,
        Err(error) => panic!("{source:?} does not compile: {error}"),
    };
    let Some(record) = RecordView::from_envelope(envelope) else {
        panic!("not an envelope: {envelope}");
    };
    filter.matches(&record)
}

/// Whether `source` matches the example order.
fn matches(source: &str) -> bool {
    matches_envelope(source, &envelope(order()))
}

fn compile_error(source: &str) -> FilterError {
    compile_error_with(source, &Limits::default())
}

fn compile_error_with(source: &str, limits: &Limits) -> FilterError {
    match Filter::compile(source, limits) {
        Ok(filter) => panic!("{source:?} compiled, to {:?}", filter.canonical()),
        Err(error) => error,
    }
}

fn canonical(source: &str) -> String {
    match Filter::compile(source, &Limits::default()) {
        Ok(filter) => filter.canonical().to_owned(),
        Err(error) => panic!("{source:?} does not compile: {error}"),
    }
}

#[test]
fn compiled_forms_can_be_shared_between_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Filter>();
    shared::<Projection>();
    shared::<FilterError>();
}

#[test]
fn the_readme_example_passes_placed_orders_of_ten_euros_or_more() {
    let source = r#"value.status == "placed" && value.total_cents >= 1000"#;
    assert!(matches(source));
    let mut small = order();
    small["total_cents"] = json!(999);
    assert!(!matches_envelope(source, &envelope(small)));
    let mut shipped = order();
    shipped["status"] = json!("shipped");
    assert!(!matches_envelope(source, &envelope(shipped)));
}

#[test]
fn every_comparison_on_numbers_strings_and_booleans() {
    for (source, expected) in [
        ("value.total_cents == 1250", true),
        ("value.total_cents != 1250", false),
        ("value.total_cents < 1251", true),
        ("value.total_cents < 1250", false),
        ("value.total_cents <= 1250", true),
        ("value.total_cents > 1249", true),
        ("value.total_cents > 1250", false),
        ("value.total_cents >= 1250", true),
        ("value.status == 'placed'", true),
        ("value.status < \"placec\"", false),
        ("value.status > \"place\"", true),
        ("value.customer.city >= \"Z\"", true),
        ("value.paid == true", true),
        ("value.paid > false", true),
        ("value.note == null", true),
        ("value.tags == [\"vip\", \"late\"]", true),
        ("value.tags == [\"late\", \"vip\"]", false),
        ("value.customer.address == value.customer.address", true),
    ] {
        assert_eq!(matches(source), expected, "{source}");
    }
}

#[test]
fn numbers_compare_by_value_across_integers_and_floats() {
    for (source, expected) in [
        ("value.total_cents == 1250.0", true),
        ("value.total_cents < 1250.5", true),
        ("value.rate == 0.5", true),
        ("value.rate < 1", true),
        ("value.rate > 0", true),
        ("value.rate >= 5e-1", true),
        ("value.big == 18446744073709551615", true),
        ("value.big > 9223372036854775807", true),
        // 2^64 as a float: above u64::MAX, which f64 rounding would make equal.
        ("value.big < 18446744073709551616.0", true),
        ("value.big == 18446744073709551616.0", false),
        ("value.negative == -9223372036854775808", true),
        ("value.negative < -9223372036854775807", true),
        ("value.negative < -1.5", true),
        ("[1, 2.0] == [1.0, 2]", true),
    ] {
        assert_eq!(matches(source), expected, "{source}");
    }
}

#[test]
fn there_is_no_implicit_conversion_between_strings_and_numbers() {
    let mut numeric = order();
    numeric["total_cents"] = json!("1250");
    let record = envelope(numeric);
    assert!(!matches_envelope("value.total_cents == 1250", &record));
    // Different types are simply unequal, as in CEL…
    assert!(matches_envelope("value.total_cents != 1250", &record));
    // …but not ordered: undefined, so neither the test nor its negation passes.
    assert!(!matches_envelope("value.total_cents >= 1000", &record));
    assert!(!matches_envelope("!(value.total_cents >= 1000)", &record));
}

#[test]
fn a_missing_field_is_undefined_and_so_is_its_negation() {
    assert!(!matches("value.missing == 1"));
    assert!(!matches("value.missing != 1"));
    assert!(!matches("!(value.missing == 1)"));
    assert!(!matches("value.customer.missing.deeper == 1"));
    assert!(!matches("value.status.length == 6"));
    assert!(!matches("value.items[2].sku == \"c\""));
    assert!(!matches("value.items.sku == \"a-1\""));
    assert!(!matches("value[\"tags\"][\"first\"] == 1"));
    // A field that holds null is present.
    assert!(matches("value.note == null"));
    assert!(!matches("value.missing == null"));
}

#[test]
fn and_and_or_absorb_undefined_operands_as_cel_does() {
    assert!(!matches("value.missing == 1 && false"));
    assert!(!matches("!(value.missing == 1 && false) && false"));
    assert!(matches("!(value.missing == 1 && false)"));
    assert!(matches("value.missing == 1 || true"));
    assert!(matches("true || value.missing == 1"));
    assert!(!matches("value.missing == 1 || false"));
    assert!(!matches("!(value.missing == 1 || false)"));
    assert!(!matches("value.missing == 1 && true"));
}

#[test]
fn not_and_or_and_parentheses() {
    assert!(matches("!false"));
    assert!(matches("!!true"));
    assert!(matches("true && true && true"));
    assert!(!matches("true && false && true"));
    assert!(matches("false || false || true"));
    assert!(!matches("false || false"));
    // && binds tighter than ||.
    assert!(matches("true || false && false"));
    assert!(!matches("(true || false) && false"));
    // ! binds tighter than ==: (!true) == false.
    assert!(matches("!true == false"));
    assert!(matches("value.paid"));
    assert!(!matches("!value.paid"));
    // A path that does not hold a boolean is undefined where a condition is needed.
    assert!(!matches("value.status"));
    assert!(!matches("!value.status"));
}

#[test]
fn in_tests_a_list_literal_a_list_in_the_record_or_a_map_s_keys() {
    assert!(matches(r#"value.status in ["placed", "paid"]"#));
    assert!(!matches(r#"value.status in ["shipped"]"#));
    assert!(matches("value.total_cents in [1, 1250.0]"));
    assert!(matches(r#""vip" in value.tags"#));
    assert!(!matches(r#""new" in value.tags"#));
    assert!(matches(r#""name" in value.customer"#));
    assert!(!matches(r#""age" in value.customer"#));
    assert!(!matches("1 in value.customer"));
    assert!(matches("[] == []"));
    assert!(!matches("1 in []"));
    // Neither a list nor a map: undefined.
    assert!(!matches(r#""p" in value.status"#));
    assert!(!matches(r#"!("p" in value.status)"#));
}

#[test]
fn string_methods_test_text_only() {
    assert!(matches(r#"value.status.startsWith("pla")"#));
    assert!(!matches(r#"value.status.startsWith("lac")"#));
    assert!(matches(r#"value.status.endsWith("ced")"#));
    assert!(matches(r#"value.status.contains("ace")"#));
    assert!(!matches(r#"value.status.contains("x")"#));
    assert!(matches(r#"value.customer.city.contains("ü")"#));
    assert!(matches(r#""abc".startsWith("")"#));
    assert!(!matches(r#"value.total_cents.startsWith("1")"#));
    assert!(!matches(r#"!value.total_cents.startsWith("1")"#));
    assert!(!matches(r#"value.status.startsWith(1)"#));
}

#[test]
fn size_counts_characters_elements_and_members() {
    assert!(matches("size(value.status) == 6"));
    assert!(matches("value.status.size() == 6"));
    assert!(matches("size(value.customer.city) == 6"));
    assert!(matches("size(value.tags) == 2"));
    assert!(matches("size(value.customer) == 3"));
    assert!(matches("size(\"\") == 0"));
    assert!(matches("size(headers) == 3"));
    assert!(!matches("size(value.total_cents) == 0"));
    assert!(!matches("size(value.missing) == 0"));
}

#[test]
fn has_tests_whether_a_path_leads_somewhere() {
    assert!(matches("has(value.status)"));
    assert!(matches("has(value.note)"));
    assert!(matches("has(value.customer.address.zip)"));
    assert!(matches("has(value[\"odd key\"])"));
    assert!(matches("has(value.items[1])"));
    assert!(!matches("has(value.items[2])"));
    assert!(!matches("has(value.missing)"));
    assert!(!matches("has(value.missing.deeper)"));
    assert!(!matches("has(value.status.deeper)"));
    assert!(matches("!has(value.missing)"));
    assert!(matches("has(headers.source)"));
    assert!(!matches("has(headers.missing)"));
}

#[test]
fn paths_reach_every_part_of_the_envelope() {
    for source in [
        r#"value["status"] == "placed""#,
        r#"value["odd key"] == "yes""#,
        r#"value.items[1].sku == "b-2""#,
        r#"value.items[0]["qty"] == 2"#,
        r#"key == "order-17""#,
        r#"key.startsWith("order-")"#,
        r#"headers.source == "web""#,
        r#"headers["x-tenant"] == "acme""#,
        r#"headers.trace == ["a", "b"]"#,
        r#""b" in headers.trace"#,
        r#"topic == "orders""#,
        "partition == 3",
        "offset >= 1000",
        "timestamp > 1700000000000",
    ] {
        assert!(matches(source), "{source}");
    }
    let mut bare = envelope(json!("plain text"));
    bare["key"] = Value::Null;
    bare["timestamp"] = Value::Null;
    assert!(matches_envelope("key == null", &bare));
    assert!(matches_envelope("timestamp == null", &bare));
    assert!(!matches_envelope("timestamp > 0", &bare));
    assert!(matches_envelope(r#"value == "plain text""#, &bare));
    assert!(!matches_envelope("value.status == \"placed\"", &bare));
    assert!(!matches_envelope("has(key.id)", &bare));
}

#[test]
fn a_view_built_by_hand_sees_no_key_as_null() {
    let filter = Filter::compile(
        "key == null && size(headers) == 0 && value == 1",
        &Limits::default(),
    );
    let Ok(filter) = filter else {
        panic!("{filter:?}");
    };
    let headers = Map::new();
    let value = json!(1);
    let record = RecordView {
        topic: "t",
        partition: 0,
        offset: 0,
        timestamp: None,
        key: None,
        headers: &headers,
        value: &value,
    };
    assert!(filter.matches(&record));
}

#[test]
fn an_envelope_of_another_shape_has_no_view() {
    for shape in [
        json!([]),
        json!({"topic": "t"}),
        json!({"topic": 1, "partition": 0, "offset": 0, "headers": {}, "value": null}),
        json!({"topic": "t", "partition": 1e10, "offset": 0, "headers": {}, "value": null}),
        json!({"topic": "t", "partition": 0, "offset": 0, "headers": [], "value": null}),
        json!({"topic": "t", "partition": 0, "offset": 0, "timestamp": "now", "headers": {}, "value": null}),
    ] {
        assert!(RecordView::from_envelope(&shape).is_none(), "{shape}");
    }
}

#[test]
fn literals_decode_cel_escapes_numbers_and_lists() {
    for source in [
        r#""\x41\u00e9\101\U0001F600\a\b\f\n\r\t\v\\\?\"\'\`" == "Aé\x41😀\a\b\f\n\r\t\v\\?\"'`""#,
        r#"'it\'s' == "it's""#,
        r#"r"\d+" == "\\d+""#,
        r#"R'\n' == "\\n""#,
        "-1 < 0",
        "-1.5 < -1",
        "1e3 == 1000",
        "1.5E+2 == 150",
        "2.5e-1 == 0.25",
        "0 == -0",
        "[1, [2, \"x\"], null, true,] == [1, [2, \"x\"], null, true]",
        "null == null",
    ] {
        assert!(matches(source), "{source}");
    }
}

#[test]
fn precedence_shows_in_the_canonical_form() {
    for (source, expected) in [
        ("true||false&&true", "true || false && true"),
        ("(true || false) && true", "(true || false) && true"),
        ("((value.a == 1))", "value.a == 1"),
        ("!(value.a == 1)", "!(value.a == 1)"),
        ("! value . paid", "!value.paid"),
        ("(!true) == false", "!true == false"),
        ("value.a == (1 == 1)", "value.a == (1 == 1)"),
        (
            "(true && true) && (true && true)",
            "true && true && true && true",
        ),
        ("(true || true) || true", "true || true || true"),
        ("value[ 'status' ] == 'x'", "value.status == \"x\""),
        ("value[\"a-b\"][0]", "value[\"a-b\"][0]"),
        ("value.in == 1", "value.in == 1"),
        ("(-1).size() == 1", "size(-1) == 1"),
        ("(-1.5).contains('1')", "(-1.5).contains(\"1\")"),
        ("(-0.0).contains('1')", "(-0.0).contains(\"1\")"),
        ("size(value.a) in [1 ,2]", "size(value.a) in [1, 2]"),
        ("value.s.startsWith( \"a\" )", "value.s.startsWith(\"a\")"),
        ("1.50 == 1.5e0", "1.5 == 1.5"),
        ("\"\\x01\\n\" == ''", "\"\\u0001\\n\" == \"\""),
    ] {
        assert_eq!(canonical(source), expected, "{source}");
        assert_eq!(canonical(expected), expected, "{expected}");
    }
}

#[test]
fn filters_that_differ_only_in_spacing_are_equal() {
    let limits = Limits::default();
    let a = Filter::compile(
        r#"value.status=="placed"&&value.total_cents>=1000"#,
        &limits,
    );
    let b = Filter::compile(
        "value . status == 'placed'\n  && ( value[\"total_cents\"] >= 1000 )",
        &limits,
    );
    assert_eq!(a, b);
    assert_eq!(
        a.map(|filter| filter.canonical().to_owned()),
        Ok(r#"value.status == "placed" && value.total_cents >= 1000"#.to_owned())
    );
}

#[test]
fn the_examples_in_docs_filters_md_mean_what_it_says() {
    assert_eq!(
        canonical(r#"value.status=='placed'&&(value["total_cents"]>=1000)"#),
        r#"value.status == "placed" && value.total_cents >= 1000"#
    );
    for (value, expected) in [
        (json!({"note": null}), true),
        (json!({}), true),
        (json!({"note": "x"}), false),
    ] {
        let record = envelope(value);
        assert_eq!(
            matches_envelope("!has(value.note) || value.note == null", &record),
            expected
        );
    }
    let record = envelope(json!({"total": 5, "vip": true}));
    assert!(matches_envelope("value.total > 10 || value.vip", &record));
    assert!(matches_envelope("value.vip || value.total > 10", &record));
    assert!(!matches_envelope(
        "has(value.missing) && value.missing > 10",
        &record
    ));
    assert!(matches("value.paid && !has(value.refunded)"));
    assert_eq!(
        projection("[\"order id\"],items").canonical(),
        "items,[\"order id\"]"
    );
    assert_eq!(
        projection("customer.name, id, customer").canonical(),
        "customer,id"
    );
}

#[test]
fn and_combines_filters_so_that_both_must_pass() {
    let limits = Limits::default();
    let compile = |source: &str| match Filter::compile(source, &limits) {
        Ok(filter) => filter,
        Err(error) => panic!("{error}"),
    };
    let manifest = compile("value.tenant == \"acme\" || value.public");
    let token = compile("value.region == \"eu\" && value.tenant == \"acme\" || value.public");
    let query = compile("value.total_cents >= 1000 && value.region == 'eu'");
    let combined = Filter::and(Filter::and(manifest, token), query);
    assert_eq!(
        combined.canonical(),
        "(value.tenant == \"acme\" || value.public) && (value.region == \"eu\" && value.tenant == \"acme\" || value.public) && value.total_cents >= 1000 && value.region == \"eu\""
    );
    let record = envelope(json!({"tenant": "acme", "region": "eu", "total_cents": 1000}));
    let Some(view) = RecordView::from_envelope(&record) else {
        panic!("not an envelope");
    };
    assert!(combined.matches(&view));
    let record = envelope(json!({"tenant": "acme", "region": "us", "total_cents": 1000}));
    let Some(view) = RecordView::from_envelope(&record) else {
        panic!("not an envelope");
    };
    assert!(!combined.matches(&view));
    // A conjunct already there is not repeated.
    let same = compile("value.a == 1").and(compile("value.a == 1 && value.b == 2"));
    assert_eq!(same.canonical(), "value.a == 1 && value.b == 2");
}

#[test]
fn every_syntax_error_names_its_position_and_reason() {
    let expected = |expected: &'static str, found: &str| Reason::Expected {
        expected,
        found: found.to_owned(),
    };
    for (source, position, reason) in [
        ("", 0, Reason::Empty),
        ("   ", 3, Reason::Empty),
        ("value.a == 1 #", 13, Reason::UnexpectedChar('#')),
        (
            "value.a = 1",
            8,
            Reason::DidYouMean {
                found: "=",
                suggestion: "==",
            },
        ),
        (
            "true & false",
            5,
            Reason::DidYouMean {
                found: "&",
                suggestion: "&&",
            },
        ),
        (
            "true | false",
            5,
            Reason::DidYouMean {
                found: "|",
                suggestion: "||",
            },
        ),
        ("value.a == \"open", 11, Reason::UnterminatedString),
        ("value.a == 'a\nb'", 11, Reason::UnterminatedString),
        (r#"value.a == "\q""#, 12, Reason::InvalidEscape),
        (r#"value.a == "\uD800""#, 12, Reason::InvalidEscape),
        (r#"value.a == "\x4""#, 12, Reason::InvalidEscape),
        (r#"value.a == "é\400""#, 14, Reason::InvalidEscape),
        (
            "value.a == 1e",
            12,
            Reason::InvalidNumber("an exponent needs digits"),
        ),
        (
            "value.a == 1e999",
            11,
            Reason::InvalidNumber("out of range"),
        ),
        (
            "value.a == 18446744073709551616",
            11,
            Reason::InvalidNumber("out of range"),
        ),
        (
            "value.a == -9223372036854775809",
            12,
            Reason::InvalidNumber("out of range"),
        ),
        (
            "value.a == 0x1f",
            12,
            Reason::InvalidNumber("only decimal numbers, without a suffix"),
        ),
        (
            "value.a == 1u",
            12,
            Reason::InvalidNumber("only decimal numbers, without a suffix"),
        ),
        (
            "value.a == 007",
            11,
            Reason::InvalidNumber("no leading zeros"),
        ),
        ("value.a ==", 10, expected("a value", "the end")),
        ("(value.a == 1", 13, expected("')'", "the end")),
        (
            "value.a == 1)",
            12,
            expected("an operator or the end", "')'"),
        ),
        (
            "value.a 1",
            8,
            expected("an operator or the end", "a number"),
        ),
        ("value.", 6, expected("a field name after '.'", "the end")),
        (
            "value.1 == 1",
            6,
            expected("a field name after '.'", "a number"),
        ),
        (
            "value[true]",
            6,
            expected("a quoted field name or an index", "'true'"),
        ),
        ("value[0 == 1", 8, expected("']'", "'=='")),
        (
            "\"a\".b == 1",
            4,
            expected("a path before a field or an index", "a value"),
        ),
        (
            "value.a in [1 2]",
            14,
            expected("',' or ']' in a list", "a number"),
        ),
        (
            "value.s.startsWith(\"a\" \"b\")",
            23,
            expected("',' or ')' after an argument", "a string"),
        ),
        ("in", 0, expected("a value", "'in'")),
        ("status == 1", 0, Reason::UnknownName("status".to_owned())),
        ("values.a == 1", 0, Reason::UnknownName("values".to_owned())),
        (
            "matches(value.a, \"x\")",
            0,
            Reason::UnknownFunction("matches".to_owned()),
        ),
        (
            "value.a.matches(\"x+\")",
            8,
            Reason::UnknownFunction("matches".to_owned()),
        ),
        (
            "value.a.startsWith()",
            8,
            Reason::Arguments {
                function: "startsWith",
                expected: "one argument",
            },
        ),
        (
            "value.a.contains(\"a\", \"b\")",
            8,
            Reason::Arguments {
                function: "contains",
                expected: "one argument",
            },
        ),
        (
            "value.a.size(1) == 1",
            8,
            Reason::Arguments {
                function: "size",
                expected: "no argument after a '.'",
            },
        ),
        (
            "size() == 1",
            0,
            Reason::Arguments {
                function: "size",
                expected: "one argument",
            },
        ),
        (
            "has(value.a, value.b)",
            0,
            Reason::Arguments {
                function: "has",
                expected: "one argument",
            },
        ),
        ("has(value)", 4, Reason::HasNeedsField),
        ("has(1)", 4, Reason::HasNeedsField),
        ("topic.name == 1", 6, Reason::NoFields("topic")),
        ("partition[0] == 1", 9, Reason::NoFields("partition")),
        ("value.a == 1 == true", 13, Reason::ChainedComparison),
        ("1 < value.a < 3", 12, Reason::ChainedComparison),
        ("value.a in [1] in [true]", 15, Reason::ChainedComparison),
        ("-value.a == 1", 1, Reason::MinusNotNumber),
        ("--1 == 1", 1, Reason::MinusNotNumber),
        ("\"placed\"", 0, Reason::NotACondition("string")),
        ("value.a == 1 && 1000", 16, Reason::NotACondition("number")),
        ("size(value.a) || true", 0, Reason::NotACondition("number")),
        ("!partition", 1, Reason::NotACondition("number")),
        ("true && [1]", 8, Reason::NotACondition("list")),
        ("value.a in [value.b]", 12, Reason::ListNotLiteral),
    ] {
        let error = compile_error(source);
        assert_eq!(
            (error.position, &error.reason),
            (position, &reason),
            "{source:?}: {error}"
        );
    }
    // The column counts characters, for people; the position bytes, for programs.
    let error = compile_error(r#"value.a == "é\400""#);
    assert_eq!((error.position, error.column), (14, 14));
}

#[test]
fn an_error_reads_well_in_a_json_body() {
    assert_eq!(
        compile_error("value.s.startsWith(\"a\" \"b\")").to_string(),
        "at column 24: expected ',' or ')' after an argument, found a string"
    );
    assert_eq!(
        compile_error("value.a = 1").to_string(),
        "at column 9: unexpected '=': did you mean '=='?"
    );
    assert_eq!(
        compile_error("stauts == 1").to_string(),
        "at column 1: unknown name 'stauts': a path starts with value, key, headers, topic, partition, offset or timestamp"
    );
}

#[test]
fn each_limit_is_enforced_at_its_boundary() {
    let limits = Limits {
        max_length: 22,
        max_depth: 3,
        max_terms: 7,
        max_list: 2,
        max_fields: 2,
    };
    let compiles = |source: &str| Filter::compile(source, &limits).is_ok();

    assert!(compiles("value.abcdefg == 12345"));
    let error = compile_error_with("value.abcdefgh == 12345", &limits);
    assert_eq!(
        (error.position, error.reason),
        (22, Reason::TooLong { limit: 22 })
    );

    assert!(compiles("(((true)))"));
    let error = compile_error_with("((((true))))", &limits);
    assert_eq!(
        (error.position, error.reason),
        (3, Reason::TooDeep { limit: 3 })
    );
    let error = compile_error_with("!!!!true", &limits);
    assert_eq!(
        (error.position, error.reason),
        (3, Reason::TooDeep { limit: 3 })
    );

    // value, .a, ==, 1, &&, value, .b: seven terms.
    assert!(compiles("value.a==1&&value.b"));
    let error = compile_error_with("value.a==1&&value.b.c", &limits);
    assert_eq!(error.reason, Reason::TooManyTerms { limit: 7 });
    let error = compile_error_with("value.a==1&&value.b==2", &limits);
    assert_eq!(
        (error.position, error.reason),
        (19, Reason::TooManyTerms { limit: 7 })
    );

    assert!(compiles("value.a in [1, 2]"));
    let error = compile_error_with("value.a in [1, 2, 3]", &limits);
    assert_eq!(
        (error.position, error.reason),
        (18, Reason::ListTooLong { limit: 2 })
    );

    assert!(Projection::parse("a.b.c,d", &limits).is_ok());
    let error = Projection::parse("a.b.c.d", &limits).err();
    assert_eq!(
        error.map(|error| (error.position, error.reason)),
        Some((5, Reason::TooDeep { limit: 3 }))
    );
    let error = Projection::parse("a,b,c", &limits).err();
    assert_eq!(
        error.map(|error| (error.position, error.reason)),
        Some((4, Reason::TooManyFields { limit: 2 }))
    );
    let error = Projection::parse("abcdefghijklmnopqrstuvw", &limits).err();
    assert_eq!(
        error.map(|error| error.reason),
        Some(Reason::TooLong { limit: 22 })
    );
}

#[test]
fn the_default_limits_take_a_long_realistic_filter() {
    let clause = r#"(value.status == "placed" && value.total_cents >= 1000) || "#;
    let source = format!("{}false", clause.repeat(15));
    assert!(source.len() <= 1024);
    assert!(Filter::compile(&source, &Limits::default()).is_ok());
    let error = compile_error(&format!("{}false", clause.repeat(18)));
    assert_eq!(error.reason, Reason::TooLong { limit: 1024 });
}

fn projection(source: &str) -> Projection {
    match Projection::parse(source, &Limits::default()) {
        Ok(projection) => projection,
        Err(error) => panic!("{source:?}: {error}"),
    }
}

#[test]
fn a_projection_keeps_only_its_paths() {
    let kept = projection("id,total_cents,customer.name").apply(&order());
    assert_eq!(
        kept,
        json!({"id": "order-17", "total_cents": 1250, "customer": {"name": "Ada"}})
    );
    let kept = projection(
        "customer.address.zip, missing, customer.missing.deeper, status.deeper, [\"odd key\"]",
    )
    .apply(&order());
    assert_eq!(
        kept,
        json!({"customer": {"address": {"zip": "8001"}}, "odd key": "yes"})
    );
    let kept = projection("items,note").apply(&order());
    assert_eq!(kept, json!({"items": order()["items"], "note": null}));
    assert_eq!(projection("missing").apply(&order()), json!({}));
    for other in [json!("text"), json!(null), json!([1, 2]), json!(3)] {
        assert_eq!(projection("id").apply(&other), other);
    }
}

#[test]
fn projections_that_select_the_same_parts_are_equal() {
    let a = projection("customer.name, id ,customer, total_cents,id");
    let b = projection("total_cents,customer,id");
    assert_eq!(a, b);
    assert_eq!(a.canonical(), "customer,id,total_cents");
    assert_eq!(
        projection("b.c, a, [\"x y\"].z, b.d").canonical(),
        "a,b.c,b.d,[\"x y\"].z"
    );
    assert_eq!(projection("[\"a\"][\"b\"]").canonical(), "a.b");
}

#[test]
fn a_bad_projection_names_its_position() {
    let error = |source: &str| Projection::parse(source, &Limits::default()).err();
    let expected = |position: usize, expected: &'static str, found: &str| {
        Some((
            position,
            Reason::Expected {
                expected,
                found: found.to_owned(),
            },
        ))
    };
    let at = |source: &str| error(source).map(|error| (error.position, error.reason));
    assert_eq!(at(""), Some((0, Reason::Empty)));
    assert_eq!(at("a,"), expected(2, "a field name", "the end"));
    assert_eq!(at("a,,b"), expected(2, "a field name", "','"));
    assert_eq!(at("a b"), expected(2, "',' or the end", "'b'"));
    assert_eq!(at("a.1"), expected(2, "a field name after '.'", "a number"));
    assert_eq!(at("a[1]"), expected(2, "a quoted field name", "a number"));
    assert_eq!(at("a == 1"), expected(2, "',' or the end", "'=='"));
    assert_eq!(
        at("a = 1"),
        Some((
            2,
            Reason::DidYouMean {
                found: "=",
                suggestion: "=="
            }
        ))
    );
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |n| n.is_finite())
            .prop_map(Value::from),
        "[a-z]{0,3}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,2}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Sources made of the language's own tokens, so that most get deep into the parser.
fn near_filter() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("value"),
        Just("key"),
        Just("headers"),
        Just("topic"),
        Just("partition"),
        Just("offset"),
        Just("timestamp"),
        Just("."),
        Just("a"),
        Just("b"),
        Just("in"),
        Just("["),
        Just("]"),
        Just("("),
        Just(")"),
        Just(","),
        Just("!"),
        Just("-"),
        Just("=="),
        Just("!="),
        Just("<"),
        Just("<="),
        Just(">"),
        Just(">="),
        Just("&&"),
        Just("||"),
        Just("true"),
        Just("false"),
        Just("null"),
        Just("0"),
        Just("1"),
        Just("2.5"),
        Just("1e3"),
        Just("\"a\""),
        Just("'b\\n'"),
        Just("r\"\\d\""),
        Just("\"\\x01\""),
        Just("has"),
        Just("size"),
        Just("startsWith"),
        Just("contains"),
        Just("endsWith"),
        Just("\"\\u00e9\""),
        Just("18446744073709551615"),
    ];
    proptest::collection::vec((token, prop_oneof![Just(""), Just(" ")]), 0..24).prop_map(|tokens| {
        tokens
            .into_iter()
            .flat_map(|(token, space)| [token, space])
            .collect()
    })
}

/// Filters that compile: every construct of the language, with random literals and
/// spacing, nested a few levels.
fn valid_filter() -> impl Strategy<Value = String> {
    let step = prop_oneof![
        Just(".a".to_owned()),
        Just(".b".to_owned()),
        Just("[\"a\"]".to_owned()),
        Just("['x y']".to_owned()),
        (0..3_u8).prop_map(|index| format!("[{index}]")),
    ];
    let path = (
        prop_oneof![Just("value"), Just("key"), Just("headers")],
        proptest::collection::vec(step, 0..3),
    )
        .prop_map(|(root, steps)| format!("{root}{}", steps.concat()));
    let scalar = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|value| value.to_string()),
        any::<i64>().prop_map(|value| value.to_string()),
        any::<f64>()
            .prop_filter("finite", |value| value.is_finite())
            .prop_map(|value| format!("{value:e}")),
        "\\PC{0,4}".prop_map(|text| Value::from(text).to_string()),
        Just("'\\x41\\u00e9\\n'".to_owned()),
    ];
    let list = proptest::collection::vec(scalar.clone(), 0..3)
        .prop_map(|elements| format!("[{}]", elements.join(", ")));
    let operand = prop_oneof![
        path.clone(),
        scalar.clone(),
        list.clone(),
        path.clone().prop_map(|path| format!("size({path})")),
        Just("topic".to_owned()),
        Just("partition".to_owned()),
        Just("timestamp".to_owned()),
    ];
    let comparison = prop_oneof![
        Just("=="),
        Just("!="),
        Just("<"),
        Just("<="),
        Just(">"),
        Just(">="),
        Just("in"),
    ];
    let condition = prop_oneof![
        (operand.clone(), comparison, operand)
            .prop_map(|(left, operator, right)| format!("{left} {operator} {right}")),
        path.clone().prop_map(|path| format!("has({path}.a)")),
        path.clone(),
        any::<bool>().prop_map(|value| value.to_string()),
        (
            path,
            prop_oneof![Just("startsWith"), Just("endsWith"), Just("contains")],
            scalar
        )
            .prop_map(|(path, method, argument)| format!("{path}.{method}({argument})")),
    ];
    condition.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|inner| format!("!({inner})")),
            (inner.clone(), prop_oneof![Just("&&"), Just("||")], inner)
                .prop_map(|(left, operator, right)| format!("({left}){operator}({right})")),
        ]
    })
}

/// Compiling never panics; what compiles has a canonical form that compiles to itself and
/// evaluates without panicking on any record.
fn check_filter(source: &str, value: &Value) {
    let limits = Limits::default();
    if let Ok(filter) = Filter::compile(source, &limits) {
        // The canonical form may be longer than the source (escapes), never deeper.
        let relaxed = Limits {
            max_length: limits.max_length * 8,
            ..limits
        };
        let again = Filter::compile(filter.canonical(), &relaxed);
        assert_eq!(
            again.as_ref().map(Filter::canonical),
            Ok(filter.canonical()),
            "{source:?}"
        );
        let record = envelope(value.clone());
        if let Some(view) = RecordView::from_envelope(&record) {
            let _ = filter.matches(&view);
            let _ = filter.clone().and(filter).matches(&view);
        }
    }
}

proptest! {
    // Failures are kept in this crate's folder (proptest would otherwise look for a `src`
    // above this file and write beside the server's sources); cargo runs tests from here.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/tests.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_filter_source_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), value in json_value()) {
        check_filter(&String::from_utf8_lossy(&bytes), &value);
    }

    #[test]
    fn fuzz_filter_source_text(source in "\\PC{0,64}", value in json_value()) {
        check_filter(&source, &value);
    }

    #[test]
    fn fuzz_filter_near_valid(source in near_filter(), value in json_value()) {
        check_filter(&source, &value);
    }

    #[test]
    fn fuzz_filter_canonical_form_keeps_meaning(source in valid_filter(), value in json_value()) {
        let limits = Limits { max_length: 1 << 16, ..Limits::default() };
        let filter = Filter::compile(&source, &limits);
        prop_assert!(filter.is_ok(), "{:?}: {:?}", source, filter);
        let Ok(filter) = filter else { return Ok(()) };
        let again = Filter::compile(filter.canonical(), &limits);
        prop_assert_eq!(again.as_ref().map(Filter::canonical), Ok(filter.canonical()));
        let Ok(again) = again else { return Ok(()) };
        let record = envelope(value);
        let view = RecordView::from_envelope(&record);
        prop_assert!(view.is_some());
        if let Some(view) = view {
            prop_assert_eq!(filter.matches(&view), again.matches(&view), "{}", filter.canonical());
        }
    }

    #[test]
    fn fuzz_projection(
        source in proptest::collection::vec(prop_oneof![
            Just("a"), Just("b"), Just("."), Just(","), Just(" "), Just("[\"c d\"]"), Just("["),
            Just("]"), Just("'e'"), Just("1"),
        ], 0..16).prop_map(|tokens| tokens.concat()),
        value in json_value(),
    ) {
        if let Ok(projection) = Projection::parse(&source, &Limits::default()) {
            let again = Projection::parse(projection.canonical(), &Limits::default());
            prop_assert_eq!(again.as_ref().map(Projection::canonical), Ok(projection.canonical()));
            let _ = projection.apply(&value);
        }
    }

    #[test]
    fn a_projection_keeps_a_subset_of_the_value(value in json_value()) {
        let kept = projection("a,b.a,b.b.a").apply(&value);
        if let (Value::Object(kept), Value::Object(value)) = (&kept, &value) {
            for (name, kept) in kept {
                prop_assert!(value.contains_key(name));
                if name == "a" {
                    prop_assert_eq!(Some(kept), value.get(name));
                }
            }
        } else {
            prop_assert_eq!(kept, value);
        }
    }
}
