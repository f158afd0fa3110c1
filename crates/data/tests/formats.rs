//! Reading datasets: format detection and override, JSON vs JSONL, and the errors bad input gets.

mod common;

use std::path::Path;

use lora_data::{load_dataset, parse_dataset, DataError, Format, Location, Message, Role};

fn parse(text: &str) -> Result<lora_data::Dataset, DataError> {
    parse_dataset(text, Path::new("data.json"), None)
}

fn msg(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.into(),
    }
}

#[test]
fn alpaca_json_array_with_system_and_history() {
    let ds = parse(
        r#"[{"instruction": "a", "input": "b", "output": "c", "system": "s",
             "history": [["u1", "a1"]]},
            {"instruction": "x", "output": "y", "system": ""}]"#,
    )
    .unwrap();
    assert_eq!(ds.format, Format::Alpaca);
    assert_eq!(
        ds.conversations[0].messages,
        vec![
            msg(Role::System, "s"),
            msg(Role::User, "u1"),
            msg(Role::Assistant, "a1"),
            msg(Role::User, "ab"),
            msg(Role::Assistant, "c"),
        ]
    );
    // No `input` is "", an empty system is no system.
    assert_eq!(
        ds.conversations[1].messages,
        vec![msg(Role::User, "x"), msg(Role::Assistant, "y")]
    );
}

#[test]
fn sharegpt_and_messages_are_detected_and_roles_mapped() {
    let ds = parse(r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#).unwrap();
    assert_eq!(ds.format, Format::ShareGpt);
    assert_eq!(
        ds.conversations[0].messages,
        vec![
            msg(Role::System, "s"),
            msg(Role::User, "q"),
            msg(Role::Assistant, "a")
        ]
    );
    let ds = parse("\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n\n").unwrap();
    assert_eq!(ds.format, Format::Messages);
    assert_eq!(ds.conversations.len(), 1, "blank lines are not records");
}

#[test]
fn explicit_format_overrides_detection() {
    // Has both keys; detection picks sharegpt, the override reads it as alpaca.
    let text = r#"{"conversations": [], "instruction": "i", "output": "o"}"#;
    let ds = parse_dataset(text, Path::new("x.jsonl"), Some(Format::Alpaca)).unwrap();
    assert_eq!(ds.format, Format::Alpaca);
    assert_eq!(ds.conversations[0].messages[0], msg(Role::User, "i"));
    assert_eq!("sharegpt".parse::<Format>().unwrap(), Format::ShareGpt);
    assert!(matches!(
        "csv".parse::<Format>(),
        Err(DataError::BadOption { what: "format", .. })
    ));
}

#[test]
fn malformed_jsonl_names_the_line_and_the_parser_reason() {
    let text =
        "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\", \"output\": }\n";
    let err = parse(text).unwrap_err();
    match &err {
        DataError::Malformed { at, line, .. } => {
            assert_eq!(
                *at,
                Location {
                    index: 1,
                    line: Some(3)
                }
            );
            assert_eq!(*line, 3);
        }
        e => panic!("wrong error {e:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("data.json")
            && msg.contains("record 1 (line 3)")
            && msg.contains("expected value"),
        "{msg}"
    );
}

#[test]
fn malformed_json_array_names_the_record() {
    let text = "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"a\" \"output\": \"b\"}\n]";
    match parse(text).unwrap_err() {
        DataError::Malformed {
            at, line, reason, ..
        } => {
            assert_eq!(
                at,
                Location {
                    index: 1,
                    line: None
                }
            );
            assert_eq!(line, 3);
            assert!(reason.contains("expected `,` or `}`"), "{reason}");
        }
        e => panic!("wrong error {e:?}"),
    }
    // Trailing garbage after the array is an error too, not ignored.
    assert!(matches!(
        parse("[{\"instruction\": \"a\", \"output\": \"b\"}] x"),
        Err(DataError::Malformed { .. })
    ));
}

#[test]
fn missing_and_non_string_fields_name_record_and_field() {
    let err = parse(r#"[{"instruction": "a", "output": "b"}, {"instruction": "a"}]"#).unwrap_err();
    assert!(
        matches!(&err, DataError::MissingField { at: Location { index: 1, .. }, field, .. } if field == "output"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("record 1 has no field `output`"),
        "{err}"
    );

    let err = parse(r#"{"instruction": "a", "input": null, "output": "b"}"#).unwrap_err();
    assert!(
        matches!(&err, DataError::WrongType { field, got: "null", .. } if field == "input"),
        "{err:?}"
    );
    let err = parse(r#"{"messages": [{"role": "user", "content": ["parts"]}]}"#).unwrap_err();
    assert!(
        matches!(&err, DataError::WrongType { field, got: "an array", .. } if field == "messages[0].content"),
        "{err:?}"
    );
    let err =
        parse(r#"{"instruction": "a", "output": "b", "history": [["only one"]]}"#).unwrap_err();
    assert!(
        matches!(&err, DataError::WrongType { field, .. } if field == "history[0]"),
        "{err:?}"
    );
    let err = parse("[1]").unwrap_err();
    assert!(
        matches!(
            &err,
            DataError::WrongType {
                expected: "a JSON object",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn unknown_roles_are_errors() {
    let err = parse(r#"{"messages": [{"role": "tool", "content": "x"}]}"#).unwrap_err();
    assert!(
        matches!(&err, DataError::UnknownRole { role, field, .. } if role == "tool" && field == "messages[0].role"),
        "{err:?}"
    );
    // sharegpt's `human`/`gpt` are not valid in the messages format.
    let err = parse(r#"{"messages": [{"role": "human", "content": "x"}]}"#).unwrap_err();
    assert!(matches!(err, DataError::UnknownRole { .. }));
    let err = parse(r#"{"conversations": [{"from": "observation", "value": "x"}]}"#).unwrap_err();
    assert!(matches!(err, DataError::UnknownRole { .. }));
}

#[test]
fn empty_inputs_are_errors() {
    for text in ["", "  \n\n", "[]", "[ ]\n"] {
        assert!(
            matches!(parse(text), Err(DataError::Empty { .. })),
            "{text:?}"
        );
    }
    assert!(matches!(
        parse(r#"{"messages": []}"#),
        Err(DataError::NoMessages { .. })
    ));
    assert!(matches!(
        parse(r#"{"prompt": "x"}"#),
        Err(DataError::UnknownFormat { .. })
    ));
    let err = load_dataset(Path::new("no/such/file.jsonl"), None).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
}

#[test]
fn sample_fixtures_parse() {
    for (f, n) in [
        ("chat_sharegpt.json", 3),
        ("chat_messages.jsonl", 3),
        ("alpaca_history.jsonl", 3),
    ] {
        let ds = load_dataset(&common::fixtures().join(f), None).unwrap();
        assert_eq!(ds.conversations.len(), n, "{f}");
    }
}
