//! The story `cargo xtask demo` tells, as a test: from metal-api's call through boot,
//! an operator's SSH session over the mesh, DERP, a crash and a power cycle, to a
//! management server through which the operator opens a BMC.

use vdc::require_lab;

#[test]
fn the_whole_story_from_allocation_to_ssh_survives_a_crash_and_a_power_cycle() {
    require_lab!();
    let lab = vdc::story::lab().unwrap();
    let mut steps = vec![];
    let result = vdc::story::run(&lab, &mut |title| {
        eprintln!("story: {title}");
        steps.push(title.to_string());
    });
    if let Err(e) = result {
        panic!("story failed after {} steps: {e:#}", steps.len());
    }
}
