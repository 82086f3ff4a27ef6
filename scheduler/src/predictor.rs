//! The meta-predictor (Algorithm 1, made robust): a fitted feature space and the gated
//! selection model of [`crate::robust`], predicting ln runtime with a calibrated uncertainty
//! for every (hardware, method) pair of a query; saved and reloaded as JSON.

use std::collections::HashMap;

use metainf_protocol::{
    ContentId, HardwareProfile, MethodConfig, ModelDescriptor, WorkloadDescriptor,
};
use serde::{Deserialize, Serialize};

use crate::dataset::Tensor;
use crate::embed::EmbeddingCache;
use crate::error::{Result, SchedulerError};
use crate::features::{Context, FeatureConfig, FeatureSpace};
pub use crate::gbdt::{Gbdt, GbdtParams, Prediction};
use crate::robust::{ContextIds, EntityIds, FitData, Robust, RobustConfig, SavedRobust};

/// Version of the saved predictor format.
pub const FORMAT_VERSION: u32 = 3;

/// The trained meta-predictor: a fitted feature space and the gated selection model
/// ([`Robust`]: Global Best plus the corrections its held-out training cells support).
#[derive(Debug)]
pub struct MetaPredictor {
    features: FeatureSpace,
    model: Robust,
    /// Training method id → its slot in the model.
    slots: HashMap<ContentId, usize>,
    params: GbdtParams,
    trained_on: usize,
}

#[derive(Serialize, Deserialize)]
struct SavedPredictor {
    version: u32,
    features: FeatureSpace,
    params: GbdtParams,
    methods: Vec<ContentId>,
    model: SavedRobust,
    trained_on: usize,
}

impl MetaPredictor {
    /// Trains on the measured entries of `cells` (all cells when `None`).
    pub fn train(
        tensor: &Tensor,
        cells: Option<&[usize]>,
        config: FeatureConfig,
        params: GbdtParams,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Self> {
        let robust = RobustConfig {
            params,
            ..RobustConfig::default()
        };
        Self::train_with(tensor, cells, config, robust, cache)
    }

    /// As [`MetaPredictor::train`], with the selection model's configuration.
    pub fn train_with(
        tensor: &Tensor,
        cells: Option<&[usize]>,
        config: FeatureConfig,
        robust: RobustConfig,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Self> {
        let params = robust.params;
        let all: Vec<usize>;
        let cells = match cells {
            Some(c) => c,
            None => {
                all = (0..tensor.cells.len()).collect();
                &all
            }
        };
        if cells.is_empty() {
            return Err(SchedulerError::Data("no cells to train on".into()));
        }
        let features = FeatureSpace::fit(tensor, cells, config, cache)?;
        let contexts = features.tensor_contexts(tensor, cache)?;
        let methods = features.tensor_methods(tensor, cache)?;
        let ids = EntityIds::of(tensor)?;
        let trained_on = cells
            .iter()
            .map(|&c| tensor.cells[c].measured().count())
            .sum();
        let data = FitData {
            tensor,
            contexts: &contexts,
            methods: &methods,
            ids: &ids,
        };
        let model = Robust::fit(&data, cells, robust)?;
        Ok(Self {
            features,
            model,
            slots: ids
                .methods
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, i))
                .collect(),
            params,
            trained_on,
        })
    }

    /// The feature space.
    pub fn features(&self) -> &FeatureSpace {
        &self.features
    }

    /// The selection model.
    pub fn model(&self) -> &Robust {
        &self.model
    }

    /// Number of (cell, method) measurements it was trained on.
    pub fn trained_on(&self) -> usize {
        self.trained_on
    }

    /// Predictions for every (hardware, method) pair of one workload and model, indexed
    /// `[hardware][method]`.
    pub fn predict_grid(
        &self,
        workload: &WorkloadDescriptor,
        model: &ModelDescriptor,
        hardware: &[&HardwareProfile],
        methods: &[MethodConfig],
        cache: Option<&EmbeddingCache>,
    ) -> Result<Vec<Vec<Prediction>>> {
        let method_rows = methods
            .iter()
            .map(|m| self.features.method(m, cache))
            .collect::<Result<Vec<_>>>()?;
        let slots = methods
            .iter()
            .map(|m| Ok(self.slots.get(&m.id()?).copied()))
            .collect::<Result<Vec<_>>>()?;
        let contexts = hardware
            .iter()
            .map(|h| {
                self.features.context(
                    Context {
                        workload,
                        hardware: h,
                        model,
                    },
                    cache,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // Ids are hashed only where the model has effects to look up.
        let model_id = self.model.uses_ids(1).then(|| model.id()).transpose()?;
        let workload_id = self.model.uses_ids(2).then(|| workload.id()).transpose()?;
        let ids = hardware
            .iter()
            .map(|h| {
                let hw = self.model.uses_ids(0).then(|| h.id()).transpose()?;
                Ok(ContextIds([hw, model_id, workload_id]))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.model.predict(&contexts, &ids, &method_rows, &slots))
    }

    /// Serialises the predictor (JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut methods = vec![ContentId([0; 32]); self.slots.len()];
        for (id, &slot) in &self.slots {
            if let Some(m) = methods.get_mut(slot) {
                *m = *id;
            }
        }
        let saved = SavedPredictor {
            version: FORMAT_VERSION,
            features: self.features.clone(),
            params: self.params,
            methods,
            model: self.model.save()?,
            trained_on: self.trained_on,
        };
        serde_json::to_vec(&saved).map_err(|e| SchedulerError::Persist(e.to_string()))
    }

    /// Loads a predictor saved by [`MetaPredictor::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let saved: SavedPredictor =
            serde_json::from_slice(bytes).map_err(|e| SchedulerError::Persist(e.to_string()))?;
        if saved.version != FORMAT_VERSION {
            return Err(SchedulerError::Persist(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                saved.version
            )));
        }
        let model = Robust::load(saved.model)?;
        if saved.methods.len() != model.methods() {
            return Err(SchedulerError::Persist(
                "the saved method list does not match the model".into(),
            ));
        }
        Ok(Self {
            features: saved.features,
            model,
            slots: saved
                .methods
                .into_iter()
                .enumerate()
                .map(|(i, id)| (id, i))
                .collect(),
            params: saved.params,
            trained_on: saved.trained_on,
        })
    }
}
