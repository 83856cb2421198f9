"""transformers remote code: a compressed folder that AutoModelForCausalLM loads pruned.

    model = AutoModelForCausalLM.from_pretrained("out/", trust_remote_code=True)   # prunes as sc.load("out/")
    model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)
    MambaForCausalLM.from_pretrained("out/")                                        # the same weights, dense

The folder's config.json keeps transformers' own model_type (mamba, mamba2, granitemoehybrid, bamba, nemotron_h,
jamba, falcon_h1), so the explicit classes and every tool that reads a standard checkpoint still load it dense, and
adds an `auto_map` naming a class of the folder's `modeling_simba.py` (a copy of REMOTE_CODE), which subclasses
SimbaForCausalLM here once per model type in REMOTE_CLASSES. A new architecture plugs in by adding its model_type there, once MambaLM and
checkpoints.parse_config know it; folders saved earlier pick it up from the installed package. The state-spaces
hybrid (mamba_ssm's attn_layer_idx layout) has none: no transformers class reads it, and mamba_ssm builds
MambaConfig(**config.json), which an auto_map (or model_type) would break; simba_compress.load prunes it.

SimbaForCausalLM holds a MambaLM's modules as its own and runs MambaLM's pruned forward. Its parameter names are
MambaLM's; the weights file has the layout's (transformers' Mamba names are MambaLM's; a hybrid's differ, and its
q, k, v and gate, up projections are separate tensors), so transformers' loading reads the tensors through
layouts.to_model, the one translation of names, as simba_compress.load does (_load_pretrained_model), and
save_pretrained writes them back through layouts.from_model, as simba_compress.save does.

Generation: transformers' generate drives the loop and this forward serves it. The first call is the pruned
prefill (MambaLM's forward, the last position's logits and every layer's state of the tokens it kept, as
simba_compress's generate prefills); each later call runs the new token through every layer from those states
(MambaLM.step): a Mamba layer's recurrent state, an attention layer's KV cache of the tokens it kept (layers.KVState,
at their original RoPE positions), both for a parallel layer (Falcon-H1: layers.ParallelState), nothing for an MLP
layer. Why not hand generate() to simba_compress's own (CUDA graphs, 12-17x faster decode on a GPU,
benchmarks/RESULTS.md): transformers' generate is what a caller of this class asks for, with its logits
processors, stopping criteria, streamers, generation_config and sampling stream, and a second loop that honours a
subset of them would answer the same call two ways. The fast path stays sc.load(folder).generate(...). The states
travel in model_kwargs under a name of our own ("simba_states"), outside transformers' cache machinery, whose names
and classes changed between 5.17 and 5.25; so beam search and assisted decoding, which reorder or crop a cache, are
refused rather than run on states they would not update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from .checkpoints import parse_config, read_weights
from .errors import SimbaError
from .layouts import from_model, to_model
from .model import MambaLM
from .pruning import SimbaConfig, padding_side

REMOTE_CODE = Path(__file__).parent / "data" / "modeling_simba.py"  # copied into every saved folder
# a folder's model_type -> the class its auto_map names (modeling_simba.py makes one per entry)
REMOTE_CLASSES = {"mamba": "SimbaMambaForCausalLM", "mamba2": "SimbaMamba2ForCausalLM",
                  "granitemoehybrid": "SimbaGraniteMoeHybridForCausalLM", "bamba": "SimbaBambaForCausalLM",
                  "nemotron_h": "SimbaNemotronHForCausalLM", "jamba": "SimbaJambaForCausalLM",
                  "falcon_h1": "SimbaFalconH1ForCausalLM", "zamba2": "SimbaZamba2ForCausalLM"}  # fmt: skip


def auto_map(model_type: str) -> dict[str, str]:
    """config.json's auto_map for a folder of this model_type."""
    return {"AutoModelForCausalLM": f"{REMOTE_CODE.stem}.{REMOTE_CLASSES[model_type]}"}


@dataclass
class SimbaStates:
    """Every layer's decoding state after the tokens seen so far (the pruned prefill's kept tokens, then each new one)."""

    layers: list  # per layer: layers.SSMState (Mamba), layers.KVState (attention: its kept tokens' keys and values),
    # layers.ParallelState (Falcon-H1's attention beside Mamba-2, Zamba2's hybrid layer: both), None (MLP)


@dataclass
class SimbaCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    simba_states: SimbaStates | None = None


class SimbaForCausalLM(PreTrainedModel, GenerationMixin):
    """A simba_compress model behind transformers' interface. Subclassed per model type (config_class) in the
    folder's modeling_simba.py; `simba` is the pruning schedule (None runs dense)."""

    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        file = Path(getattr(config, "_name_or_path", "") or ".") / "config.json"
        try:
            layout, shape, simba = parse_config(config.to_dict(), file)
        except SimbaError as e:
            raise ValueError(str(e)) from None
        self.weights_layout = layout  # the weights file's names (layouts.LAYOUTS)
        lm = MambaLM(shape, simba)
        self.backbone, self.lm_head = lm.backbone, lm.lm_head
        # not a submodule: its modules are this model's own (one set of parameter names, MambaLM's)
        self.__dict__["simba_model"] = lm
        self.post_init()

    @property
    def simba(self) -> SimbaConfig | None:
        return self.simba_model.simba

    @simba.setter
    def simba(self, value: SimbaConfig | None) -> None:
        self.simba_model.simba = value

    def get_input_embeddings(self):
        return self.backbone.embeddings

    def set_input_embeddings(self, value):
        self.backbone.embeddings = value

    def _init_weights(self, module):
        pass  # every tensor comes from the weights file; MambaLM's constructors already gave from_config a model

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """from_pretrained's reading of the weights, given the tensors under MambaLM's names (layouts.to_model).
        Overridden (the same signature in transformers 5.17 and 5.25) because the public ways do not fit: key_mapping
        only renames, where a hybrid's q, k, v (Bamba's gate, up) become one tensor of ours, and a registered
        conversion mapping would be a second table of the layouts' names, in regular expressions."""
        if state_dict is None and checkpoint_files:
            state_dict, _ = read_weights(Path(checkpoint_files[0]).parent)
        if state_dict is not None:
            state_dict = to_model(state_dict, model.simba_model.config, model.weights_layout)
        return PreTrainedModel._load_pretrained_model(model, state_dict, None, load_config, *args, **kwargs)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        """transformers' save, the tensors under the layout's names (layouts.from_model), so the explicit class reads
        the folder dense as it read the one this model came from (config.json keeps the schedule and auto_map)."""
        sd = self.state_dict() if state_dict is None else state_dict
        return super().save_pretrained(save_directory, is_main_process, from_model(sd, self.simba_model.config), **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        simba_states: SimbaStates | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Logits of input_ids (b, l) with the prompt pruned as simba_compress.load's model prunes it (padding
        on either side, given attention_mask). With simba_states, input_ids are new tokens that run through every
        layer from those states. use_cache=True: return every layer's state for the next call (generate's prefill).
        logits_to_keep: the last positions' logits only (0: all), as transformers' models take it."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: not supported by a simba-compress model (the pruning reads token ids)")
        lm = self.simba_model
        use_cache = bool(use_cache)  # the states only when asked (generate asks): a scoring call needs none
        if simba_states is not None:
            layers, steps = simba_states.layers, []
            for t in range(input_ids.shape[1]):
                step_logits, layers = lm.step(input_ids[:, t], layers)
                steps.append(step_logits)
            logits, states = torch.stack(steps, 1), SimbaStates(layers)
        else:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
            if use_cache and attention_mask is not None and not bool(attention_mask.bool().all()):
                if padding_side(attention_mask) != "left":  # a right-padded row's state would end on its padding
                    raise ValueError("generate: batched prompts must be left-padded (tokenizer.padding_side = 'left')")
            last = logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep > 0 else None
            out = lm(input_ids, attention_mask, return_states=use_cache, last_logits=last)
            logits, states = out.logits, SimbaStates(out.states) if use_cache else None
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, states) if v is not None)
        return SimbaCausalLMOutput(loss=loss, logits=logits, simba_states=states)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, simba_states=None, **kwargs):
        """The whole prompt first (pruned prefill), then only the newest token, read with the states."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
        if simba_states is not None:
            inputs.update(input_ids=input_ids[:, -1:], attention_mask=None, simba_states=simba_states)
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)
        model_kwargs["simba_states"] = outputs.simba_states
        return model_kwargs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the states travel as simba_states (above), not in a transformers Cache

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' generate, greedy or sampling (the decoding modes that never reorder or crop the states)."""
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        rest = config.update(**kwargs)  # what is left are model inputs and generate's own arguments
        mode = config.get_generation_mode(rest.get("assistant_model"))
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(f"generate: {mode.value} is not supported by a simba-compress model; greedy or sampling only")
        return super().generate(inputs, generation_config=generation_config, **kwargs)
