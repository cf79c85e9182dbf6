//! Adam over the trigger rows, the learning-rate schedule, gradient clipping and the stealth
//! projection. Plain loops over `f32` buffers: the trainable state is a few thousand numbers.

use crate::config::Schedule;

#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates taken so far (for bias correction).
    pub t: u64,
}

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

impl Adam {
    pub fn new(n: usize) -> Self {
        Adam { m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    /// One update of `params` against `grad` with step size `lr`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f64) {
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t as i32);
        let c2 = 1.0 - BETA2.powi(self.t as i32);
        for i in 0..params.len() {
            let g = grad[i] as f64;
            let m = BETA1 * self.m[i] as f64 + (1.0 - BETA1) * g;
            let v = BETA2 * self.v[i] as f64 + (1.0 - BETA2) * g * g;
            self.m[i] = m as f32;
            self.v[i] = v as f32;
            params[i] = (params[i] as f64 - lr * (m / c1) / ((v / c2).sqrt() + EPS)) as f32;
        }
    }
}

/// Learning rate at `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, lr: f64, warmup: usize, step: usize, total: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let p = ((step - warmup) as f64 / span).min(1.0);
            let floor = 0.1 * lr;
            floor + (lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

/// Scales `grad` so its norm is at most `max` (0: no clipping); returns the norm before.
pub fn clip(grad: &mut [f32], max: f64) -> f64 {
    let norm = grad.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
    if max > 0.0 && norm > max {
        let s = (max / norm) as f32;
        grad.iter_mut().for_each(|g| *g *= s);
    }
    norm
}

/// Rescales each row of `rows` (`d` wide) to norm `target`.
pub fn project_rows(rows: &mut [f32], d: usize, target: f64) {
    for r in rows.chunks_mut(d) {
        let n = r.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        if n > 0.0 {
            let s = (target / n) as f32;
            r.iter_mut().for_each(|x| *x *= s);
        }
    }
}

/// Row norms of a `[n, d]` table and their median.
pub fn median_row_norm(table: &[f32], d: usize) -> f64 {
    let mut norms: Vec<f64> = table.chunks(d).map(|r| r.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()).collect();
    norms.sort_by(f64::total_cmp);
    let n = norms.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        norms[n / 2]
    } else {
        (norms[n / 2 - 1] + norms[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_minimises_a_quadratic() {
        let mut p = vec![3.0f32, -2.0];
        let mut a = Adam::new(2);
        for _ in 0..2000 {
            let g: Vec<f32> = p.iter().map(|x| 2.0 * x).collect();
            a.step(&mut p, &g, 0.01);
        }
        assert!(p.iter().all(|x| x.abs() < 1e-2), "{p:?}");
    }

    #[test]
    fn first_adam_step_has_size_lr() {
        // With bias correction the first step is lr * sign(g).
        let mut p = vec![0.0f32; 3];
        Adam::new(3).step(&mut p, &[5.0, -0.001, 1e3], 0.1);
        for x in p {
            assert!((x.abs() - 0.1).abs() < 1e-4);
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let l = |s| lr_at(Schedule::Cosine, 1.0, 10, s, 110);
        assert!((l(0) - 0.1).abs() < 1e-12 && (l(9) - 1.0).abs() < 1e-12);
        assert!((l(10) - 1.0).abs() < 1e-12 && (l(60) - 0.55).abs() < 1e-12 && (l(110) - 0.1).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 0.5, 0, 99, 100), 0.5);
    }

    #[test]
    fn clip_and_project() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut r = vec![3.0f32, 4.0, 0.0, 2.0];
        project_rows(&mut r, 2, 10.0);
        assert_eq!(r, vec![6.0, 8.0, 0.0, 10.0]);
        assert_eq!(median_row_norm(&[3.0, 4.0, 0.0, 1.0, 0.0, 2.0], 2), 2.0);
    }
}
