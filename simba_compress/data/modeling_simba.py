"""Remote code of a simba-compress folder (copied here by simba_compress.save).

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)   # pruned, as simba_compress.load runs it
    MambaForCausalLM.from_pretrained(folder)                               # the same weights, dense

(the dense class is the folder's model_type's own: Mamba2ForCausalLM, GraniteMoeHybridForCausalLM, BambaForCausalLM,
NemotronHForCausalLM, JambaForCausalLM, FalconH1ForCausalLM). The model lives in the simba-compress package (simba_compress/hf.py); this file makes one
class per model type it supports, the one config.json's auto_map names.
"""

try:
    from simba_compress.hf import REMOTE_CLASSES, SimbaForCausalLM
except ImportError as e:  # transformers skips imports inside try blocks in its own check, so this is the message
    if not (e.name or "").startswith("simba_compress"):
        raise
    raise ImportError(
        f"This model prunes its prompt with the simba-compress package, which could not be imported ({e}): pip "
        "install simba-compress (or pip install . from its source; a version that has simba_compress.hf). Without "
        "it, the model type's own transformers class (MambaForCausalLM, BambaForCausalLM, ...) loads the same weights dense."
    ) from None

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

for _model_type, _name in REMOTE_CLASSES.items():
    _attrs = {"config_class": CONFIG_MAPPING[_model_type], "__module__": __name__}  # saved with this file
    globals()[_name] = type(_name, (SimbaForCausalLM,), _attrs)
