//! How cells are split into folds: at random, or with whole hardware profiles, models or
//! workloads held out (the zero-shot setting of the paper's Table 5).

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::dataset::Tensor;
use crate::error::{Result, SchedulerError};

/// How cells are split into folds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Cells shuffled into folds.
    #[default]
    Random,
    /// Whole hardware profiles held out.
    Hardware,
    /// Whole models held out.
    Model,
    /// Whole workloads held out.
    Workload,
}

impl Split {
    /// The group a cell is held out with: itself, or its hardware, model or workload.
    pub(crate) fn group_of(self, tensor: &Tensor, c: usize) -> usize {
        let cell = &tensor.cells[c];
        match self {
            Split::Random => c,
            Split::Hardware => cell.hardware,
            Split::Model => cell.model,
            Split::Workload => cell.workload,
        }
    }
}

impl FromStr for Split {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Self::Random),
            "hardware" => Ok(Self::Hardware),
            "model" => Ok(Self::Model),
            "workload" => Ok(Self::Workload),
            other => Err(SchedulerError::invalid(
                "split",
                format!("`{other}` (expected random, hardware, model or workload)"),
            )),
        }
    }
}

/// Splits `cells` into folds of test cells.
pub fn folds(
    tensor: &Tensor,
    cells: &[usize],
    split: Split,
    k: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let k = k.max(2);
    let group = |c: usize| split.group_of(tensor, c);
    let mut groups: Vec<usize> = cells
        .iter()
        .map(|&c| group(c))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    groups.shuffle(&mut rng);
    let k = k.min(groups.len());
    let mut out = vec![Vec::new(); k];
    let fold_of: BTreeMap<usize, usize> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| (*g, i % k))
        .collect();
    for &c in cells {
        out[fold_of[&group(c)]].push(c);
    }
    out.retain(|f| !f.is_empty());
    out
}
