use super::*;

fn problems(yaml: &str) -> Vec<Problem> {
    match load_str(yaml, "wf.yaml") {
        Ok(_) => Vec::new(),
        Err(Error::Invalid { problems }) => problems,
        Err(other) => panic!("expected validation problems, got {other}"),
    }
}

fn has(ps: &[Problem], step: &str, field: &str, needle: &str) -> bool {
    ps.iter().any(|p| {
        p.file == "wf.yaml"
            && p.step.as_deref() == Some(step)
            && p.field == field
            && p.message.contains(needle)
    })
}

const OK: &str = r#"
name: orders
input: {type: object, required: [n], properties: {n: {type: integer}}}
steps:
  - id: a
    type: transform
    output: {n: "{{ input.n }}"}
  - id: b
    type: http
    needs: [a]
    url: "http://localhost/{{ steps.a.output.n }}"
    retry: {max_attempts: 4, backoff: {initial: 10ms, max: 1s, multiplier: 2}}
    timeout: 5s
  - id: c
    type: validate
    needs: [b]
    when: "steps.b.output.status == 200"
    assert: ["steps.b.output.body.ok == true", {expr: "input.n > 0", message: "n must be positive"}]
  - id: d
    type: transform
    needs: [a]
    for_each: {items: "[1, 2, 3]", concurrency: 2}
    output: "{{ item * 2 }}"
  - id: e
    type: transform
    needs: [c, d]
    trigger: all_done
    loop: {until: "steps.e.output.i >= 2", max_iterations: 5}
    output: {i: "{{ iteration }}"}
"#;

#[test]
fn a_good_workflow_loads_from_yaml_and_json() {
    let wf = load_str(OK, "wf.yaml").unwrap();
    assert_eq!(wf.steps.len(), 5);
    assert_eq!(wf.steps[1].retry.as_ref().unwrap().max_attempts, 4);
    let json = serde_json::to_string(&wf).unwrap();
    let again = load_str(&json, "wf.json").unwrap();
    assert_eq!(wf, again);
}

#[test]
fn backoff_grows_and_caps() {
    let wf = load_str(OK, "wf.yaml").unwrap();
    let b = &wf.steps[1].retry.as_ref().unwrap().backoff;
    assert_eq!(b.delay(1).as_millis(), 10);
    assert_eq!(b.delay(2).as_millis(), 20);
    assert_eq!(b.delay(30).as_millis(), 1000);
}

#[test]
fn syntax_errors_have_a_location() {
    let e = load_str("name: x\nsteps:\n  - id: a\n    type: [\n", "bad.yaml").unwrap_err();
    match e {
        Error::Parse { file, location, .. } => {
            assert_eq!(file, "bad.yaml");
            assert!(location.is_some());
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        load_str("name: x\nsteps: 3\n", "bad.yaml"),
        Err(Error::Parse { .. })
    ));
}

#[test]
fn duplicate_ids_and_unknown_needs() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: a, type: transform, output: 2, needs: [zz]}\n",
    );
    assert!(has(&ps, "a", "id", "duplicate"), "{ps:?}");
    assert!(has(&ps, "a", "needs", "no step `zz`"), "{ps:?}");
}

#[test]
fn cycles_print_their_path() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: transform, output: 1, needs: [c]}\n  - {id: b, type: transform, output: 1, needs: [a]}\n  - {id: c, type: transform, output: 1, needs: [b]}\n",
    );
    let p = ps
        .iter()
        .find(|p| p.message.contains("cycle"))
        .expect("cycle reported");
    assert_eq!(p.field, "needs");
    assert!(p.message.contains("a -> c -> b -> a"), "{}", p.message);
}

#[test]
fn unknown_types_and_fields() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: teleport}\n  - {id: b, type: http, url: 'http://x', methd: GET}\n  - {id: c, type: http}\n",
    );
    assert!(
        has(&ps, "a", "type", "unknown step type `teleport`"),
        "{ps:?}"
    );
    assert!(has(&ps, "b", "methd", "unknown field"), "{ps:?}");
    assert!(has(&ps, "c", "url", "missing field"), "{ps:?}");
}

#[test]
fn bad_expressions_and_templates() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: transform, output: '{{ input. }}'}\n  - {id: b, type: transform, output: 1, needs: [a], when: 'input.n >'}\n  - {id: c, type: transform, output: 1, for_each: {items: ')(', concurrency: 0}}\n",
    );
    assert!(has(&ps, "a", "output", "does not parse"), "{ps:?}");
    assert!(has(&ps, "b", "when", "not a valid CEL"), "{ps:?}");
    assert!(has(&ps, "c", "for_each.items", "not a valid CEL"), "{ps:?}");
    assert!(
        has(&ps, "c", "for_each.concurrency", "at least 1"),
        "{ps:?}"
    );
}

#[test]
fn reads_of_steps_that_may_not_have_run() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, output: '{{ steps.a.output }}'}\n  - {id: c, type: transform, output: 1, needs: [a], when: 'steps.nope.output'}\n",
    );
    assert!(
        has(&ps, "b", "output", "not among this step's needs"),
        "{ps:?}"
    );
    assert!(has(&ps, "c", "when", "no step `nope`"), "{ps:?}");
}

#[test]
fn unreachable_steps() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: transform, output: 1, when: 'false'}\n  - {id: b, type: transform, output: 1, needs: [a]}\n  - {id: c, type: transform, output: 1, compensate: {step: undo}}\n  - {id: undo, type: transform, output: 1}\n  - {id: d, type: transform, output: 1, needs: [undo]}\n",
    );
    assert!(has(&ps, "a", "when", "never run"), "{ps:?}");
    assert!(has(&ps, "b", "needs", "never run"), "{ps:?}");
    assert!(
        has(&ps, "d", "needs", "only runs as a compensation"),
        "{ps:?}"
    );
    assert!(!ps.iter().any(|p| p.step.as_deref() == Some("c")), "{ps:?}");
}

#[test]
fn schema_invalid_fields() {
    let ps = problems(
        "name: 'bad name'\nsteps:\n  - {id: a-b, type: wait}\n  - {id: c, type: transform, output: 1, retry: {max_attempts: 0}, loop: {until: 'true', max_iterations: 0}}\n",
    );
    assert!(
        ps.iter().any(|p| p.field == "name" && p.step.is_none()),
        "{ps:?}"
    );
    assert!(has(&ps, "a-b", "id", "starts with a letter"), "{ps:?}");
    assert!(
        has(&ps, "a-b", "duration", "needs `duration` or `until`"),
        "{ps:?}"
    );
    assert!(has(&ps, "c", "retry.max_attempts", "at least 1"), "{ps:?}");
    assert!(has(&ps, "c", "loop.max_iterations", "at least 1"), "{ps:?}");
    // Wrong types are parse errors with a location.
    assert!(matches!(
        load_str(
            "name: x\nsteps:\n  - {id: a, type: wait, duration: 5s, timeout: soon}\n",
            "wf.yaml"
        ),
        Err(Error::Parse { .. })
    ));
}

#[test]
fn compensate_is_parsed_and_checked() {
    let ps = problems(
        "name: x\nsteps:\n  - {id: a, type: transform, output: 1, compensate: {step: ghost}}\n  - {id: b, type: transform, output: 1, compensate: {type: http}}\n",
    );
    assert!(
        has(&ps, "a", "compensate.step", "no step `ghost`"),
        "{ps:?}"
    );
    assert!(has(&ps, "b", "compensate.url", "missing field"), "{ps:?}");
}

/// The repository, from the package folder cargo gives the running test (a target folder
/// shared by several clones may hold a build made in another clone).
fn repo() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || env!("CARGO_MANIFEST_DIR").into(),
        std::path::PathBuf::from,
    );
    dir.join("../..")
}

#[test]
fn the_published_schema_matches_the_generated_one() {
    let generated = serde_json::to_string_pretty(&definition_schema()).unwrap();
    let path = repo().join("schemas/workflow.schema.json");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    if std::env::var_os("AOB_BLESS").is_some() {
        std::fs::write(&path, format!("{generated}\n")).unwrap();
        return;
    }
    assert_eq!(
        on_disk.trim_end(),
        generated,
        "schemas/workflow.schema.json is stale: run `AOB_BLESS=1 cargo test -p aob-model`"
    );
}

#[test]
fn every_example_is_valid() {
    let dir = repo().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path().join("workflow.yaml");
        if path.is_file() {
            load_file(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 5, "expected the five examples, found {n}");
}

/// A node type is one descriptor: its fields that are not templates exist in its schema,
/// its check refuses an unknown field naming it, and the definition schema lists it.
#[test]
fn every_registered_node_type_is_complete() {
    let schema = definition_schema();
    let listed = schema
        .pointer("/$defs/Step/properties/type/enum")
        .cloned()
        .unwrap();
    for t in crate::nodes::REGISTRY {
        let own = serde_json::to_value((t.schema)()).unwrap();
        for (field, _) in t.fields {
            assert!(
                own.pointer(&format!("/properties/{field}")).is_some(),
                "{}: `{field}` is not in its schema",
                t.name
            );
        }
        let mut bad = serde_json::Map::new();
        bad.insert("no_such_field".into(), serde_json::json!(1));
        let (field, _) = (t.check)(&bad).unwrap_err();
        assert!(
            !field.is_empty(),
            "{}: a failed check names no field",
            t.name
        );
        assert!(
            listed
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(t.name))
        );
    }
}

/// Phases and shapes: a step's phase is stored as its status and attempt, so records from
/// before phases read as they are, and each phase maps back to the same fields.
#[test]
fn a_steps_phase_and_shape_come_from_its_state() {
    use crate::state::{Phase, Shape, Slot, StepState, StepStatus};
    let read = |status: &str, attempt: u32| -> StepState {
        serde_json::from_value(serde_json::json!({"status": status, "attempt": attempt})).unwrap()
    };
    assert_eq!(read("PENDING", 0).phase(), Phase::NotStarted);
    assert_eq!(
        read("PENDING", 1).phase(),
        Phase::BackingOff { next_attempt: 2 }
    );
    assert_eq!(read("RUNNING", 2).phase(), Phase::Out { attempt: 2 });
    assert_eq!(read("WAITING", 1).phase().attempt_out(), Some(1));
    assert_eq!(
        read("COMPLETED", 3).phase(),
        Phase::Done {
            status: StepStatus::Completed,
            attempts: 3
        }
    );
    for (status, attempt) in [
        ("PENDING", 0),
        ("PENDING", 2),
        ("RUNNING", 1),
        ("SKIPPED", 0),
    ] {
        let st = read(status, attempt);
        let back = serde_json::to_value(&st).unwrap();
        assert_eq!(back["status"], serde_json::json!(status));
        assert_eq!(back["attempt"], serde_json::json!(attempt));
    }
    let st = StepState::pending();
    assert_eq!(st.shape(), Shape::Single);
    assert!(st.phase().done(StepStatus::Skipped).is_done());
    // Shapes read from the fields records were always written with, and written back so.
    let looped = read_shape(serde_json::json!({"status": "RUNNING", "attempt": 1, "iteration": 3}));
    assert_eq!(looped.shape(), Shape::Loop);
    assert_eq!(looped.iteration(), Some(3));
    let fan = read_shape(serde_json::json!({
        "status": "RUNNING", "attempt": 1, "items": [10, 20],
        "slots": [{"status": "PENDING", "attempt": 0}, {"status": "RUNNING", "attempt": 2}]
    }));
    assert_eq!(fan.shape(), Shape::ForEach);
    assert_eq!(
        fan.items(),
        Some(&vec![serde_json::json!(10), serde_json::json!(20)])
    );
    assert_eq!(fan.slots()[0].phase(), Phase::NotStarted);
    assert_eq!(fan.slots()[1].phase(), Phase::Out { attempt: 2 });
    for st in [looped, fan] {
        let again = read_shape(serde_json::to_value(&st).unwrap());
        assert_eq!(again, st);
    }
    assert_eq!(Slot::pending().phase(), Phase::NotStarted);
}

fn read_shape(v: serde_json::Value) -> crate::state::StepState {
    serde_json::from_value(v).unwrap()
}

#[test]
fn people_in_the_loop_mistakes_name_the_step_and_field() {
    let ps = problems(
        r#"
name: w
steps:
  - {id: a, type: transform, output: 1}
  - {id: review, type: human, needs: [a], approvers: {users: [alice]}, required: 2}
  - {id: nobody, type: human, approvers: {}}
  - {id: late, type: human, approvers: {users: [x]}, deadline: {after: 1h, action: escalate}}
  - {id: loopy, type: human, approvers: {users: [x]}, for_each: {items: "[1]"}}
  - {id: back, type: transform, needs: [a], output: 1, on_failure: {rollback_to: other}}
  - {id: other, type: transform, output: 1}
  - {id: sub, type: workflow, workflow: "not a name"}
  - {id: undo, type: transform, output: 1, compensate: {type: human, approvers: {users: [x]}}}
"#,
    );
    assert!(
        has(&ps, "undo", "compensate.type", "runs a function"),
        "{ps:?}"
    );
    assert!(has(&ps, "review", "required", "only 1 users"), "{ps:?}");
    assert!(has(&ps, "nobody", "approvers", "at least one"), "{ps:?}");
    assert!(
        has(&ps, "late", "deadline.to", "`escalate` needs `to`"),
        "{ps:?}"
    );
    assert!(has(&ps, "loopy", "for_each", "runs once"), "{ps:?}");
    assert!(
        has(
            &ps,
            "back",
            "on_failure.rollback_to",
            "not among this step's needs"
        ),
        "{ps:?}"
    );
    assert!(has(&ps, "sub", "workflow", "not a workflow name"), "{ps:?}");
}

#[test]
fn on_failure_reads_every_form_and_explains_a_wrong_one() {
    let wf = |f: &str| {
        load_str(
            &format!(
                "name: w\non_failure: {f}\nsteps:\n  - {{id: a, type: transform, output: 1}}\n"
            ),
            "wf.yaml",
        )
    };
    use crate::definition::{CompensatedEnd, OnFailure};
    assert_eq!(wf("fail").unwrap().on_failure, Some(OnFailure::Fail));
    assert_eq!(
        wf("compensate").unwrap().on_failure,
        Some(OnFailure::Compensate {
            end: CompensatedEnd::Compensated
        })
    );
    assert_eq!(
        wf("{compensate: {end: failed}}").unwrap().on_failure,
        Some(OnFailure::Compensate {
            end: CompensatedEnd::Failed
        })
    );
    assert_eq!(
        wf("{rollback_to: a}").unwrap().on_failure,
        Some(OnFailure::RollbackTo("a".into()))
    );
    let err = wf("retry").unwrap_err().to_string();
    assert!(
        err.contains("not a failure action") && err.contains("rollback_to"),
        "{err}"
    );
    let err = wf("{rollback_to: nope}").unwrap_err().to_string();
    assert!(err.contains("no step `nope`"), "{err}");
}
