//! The README's Learner snippet is the code of `examples/learner_minimal.rs` (its `README:start`
//! … `README:end` regions), so that the snippet is compiled and run with the example.

fn readme_learner_snippet() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let start = readme.find("## Inside Burn's Learner").expect("the README has a Learner section");
    let section = &readme[start..];
    let block = section.split("```rust,ignore\n").nth(1).expect("the section has a code block");
    let block = block.split("\n```").next().unwrap_or_default();
    block.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with("//")).map(String::from).collect()
}

fn example_regions() -> Vec<String> {
    let example = include_str!("../learner_minimal.rs");
    let mut lines = Vec::new();
    let mut inside = false;
    for line in example.lines().map(str::trim) {
        match line {
            "// README:start" => inside = true,
            "// README:end" => inside = false,
            _ if inside && !line.is_empty() && !line.starts_with("//") => lines.push(line.to_string()),
            _ if line.starts_with("use burn_sam_sample::{") && line.contains("learner::*") => {
                lines.push(line.replace("backend, ", ""))
            }
            _ => {}
        }
    }
    lines
}

#[test]
fn the_readme_learner_snippet_is_the_examples_code() {
    let snippet = readme_learner_snippet();
    assert!(snippet.len() >= 20, "the snippet was found: {snippet:?}");
    let mut example = example_regions().into_iter();
    for line in &snippet {
        assert!(
            example.by_ref().any(|candidate| &candidate == line),
            "README line `{line}` is not in examples/learner_minimal.rs (in this order)"
        );
    }
}
