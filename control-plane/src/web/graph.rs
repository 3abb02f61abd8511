//! A test's step graph drawn as SVG: steps as boxes in columns by depth
//! (a step sits one column right of the deepest step it comes `after`),
//! `after` as arrows, each box coloured by its step's phase. Pure: the
//! layout is a function of the expanded spec and the step statuses.
use maud::{html, Markup};
use std::collections::HashMap;
use testbus_proto::steps::Expanded;
use testbus_proto::StepStatus;

const BOX_W: usize = 170;
const BOX_H: usize = 40;
const GAP_X: usize = 50;
const GAP_Y: usize = 14;

/// Where each step goes: (column, row), in the order of `steps`.
pub fn layout(steps: &[Expanded]) -> Vec<(usize, usize)> {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, e)| (e.step.name.as_str(), i)).collect();
    // Depth by repeated relaxation: `after` has no cycles (validated), and
    // a bound keeps a bad graph from looping.
    let mut depth = vec![0usize; steps.len()];
    for _ in 0..steps.len() {
        let mut changed = false;
        for (i, e) in steps.iter().enumerate() {
            let d = e.step.after.iter().filter_map(|a| index.get(a.as_str())).map(|&j| depth[j] + 1).max().unwrap_or(0);
            if d > depth[i] {
                depth[i] = d;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut rows: HashMap<usize, usize> = HashMap::new();
    depth
        .iter()
        .map(|&d| {
            let r = rows.entry(d).or_default();
            *r += 1;
            (d, *r - 1)
        })
        .collect()
}

/// The graph; each box has `id="step-NAME"` and `data-phase`.
pub fn svg(steps: &[Expanded], status: &[StepStatus]) -> Markup {
    let places = layout(steps);
    let phase: HashMap<&str, &str> = status.iter().map(|s| (s.name.as_str(), s.phase.as_str())).collect();
    let cols = places.iter().map(|p| p.0 + 1).max().unwrap_or(0);
    let rows = places.iter().map(|p| p.1 + 1).max().unwrap_or(0);
    let (w, h) = (cols * (BOX_W + GAP_X) + 10, rows * (BOX_H + GAP_Y) + 10);
    let at = |(c, r): (usize, usize)| (5 + c * (BOX_W + GAP_X), 5 + r * (BOX_H + GAP_Y));
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, e)| (e.step.name.as_str(), i)).collect();
    html! {
        svg.graph xmlns="http://www.w3.org/2000/svg" width=(w) height=(h) viewBox={"0 0 " (w) " " (h)} {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto" {
                    path d="M0,0 L10,5 L0,10 z" fill="#667" {}
                }
            }
            @for (i, e) in steps.iter().enumerate() {
                @for a in &e.step.after {
                    @if let Some(&j) = index.get(a.as_str()) {
                        @let ((x1, y1), (x2, y2)) = (at(places[j]), at(places[i]));
                        line.after x1=(x1 + BOX_W) y1=(y1 + BOX_H / 2) x2=(x2) y2=(y2 + BOX_H / 2)
                            stroke="#667" marker-end="url(#arrow)" {}
                    }
                }
            }
            @for (i, e) in steps.iter().enumerate() {
                @let (x, y) = at(places[i]);
                @let p = phase.get(e.step.name.as_str()).copied().filter(|p| !p.is_empty()).unwrap_or("Waiting");
                g id={"step-" (e.step.name)} data-phase=(p) class={"step phase-" (p)} {
                    title { (e.step.name) ": " (p) }
                    rect x=(x) y=(y) width=(BOX_W) height=(BOX_H) rx="6" {}
                    text x=(x + 8) y=(y + 17) { (truncate(&e.step.name, 22)) }
                    text.sub x=(x + 8) y=(y + 32) { (p) " · " (e.step.on.join(", ")) }
                }
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{Step, TestSpec};

    fn step(name: &str, after: &[&str]) -> Step {
        Step { name: name.into(), after: after.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn steps_go_one_column_right_of_what_they_come_after() {
        let spec = TestSpec {
            steps: vec![step("setup", &[]), step("a", &["setup"]), step("b", &["setup"]), step("end", &["a", "b"])],
            ..Default::default()
        };
        let ex = testbus_proto::steps::expand(&spec);
        assert_eq!(layout(&ex), vec![(0, 0), (1, 0), (1, 1), (2, 0)]);
        let status = vec![StepStatus { name: "a".into(), phase: "Succeeded".into(), ..Default::default() }];
        let out = svg(&ex, &status).into_string();
        assert!(out.contains(r#"id="step-a" data-phase="Succeeded""#), "{out}");
        assert!(out.contains(r#"id="step-end" data-phase="Waiting""#), "{out}");
        assert_eq!(out.matches("<line").count(), 4, "one arrow per after");
    }

    #[test]
    fn names_are_escaped() {
        let spec = TestSpec { steps: vec![step("x", &[])], ..Default::default() };
        let mut ex = testbus_proto::steps::expand(&spec);
        ex[0].step.on = vec!["<script>".into()];
        assert!(!svg(&ex, &[]).into_string().contains("<script>"));
    }
}
