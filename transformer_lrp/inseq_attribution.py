"""The package's methods as inseq attribution methods (``pip install --no-deps inseq==0.7.1`` and its pure-Python
needs, see scripts/install.sh; an optional extra). Importing this module registers them:

    import inseq
    import transformer_lrp.inseq_attribution                       # "tlrp_transformer_attribution", "tlrp_gae", …
    model = inseq.load_model(causal_lm, "tlrp_transformer_attribution", tokenizer=tokenizer)
    out = model.attribute("The capital of France is", generation_args={"max_new_tokens": 5, "do_sample": False})
    out.show()

Each generation step explains the generated token's **logit** (inseq's ``attributed_fn="logit"``, the default of a
model loaded with these methods; another step function is refused, since the methods explain a logit) over the
prompt and the tokens generated before it, by ``transformer_lrp.explain``: one forward and one reverse sweep per
step, as inseq runs its gradient methods. ``explain``'s options (``start_layer``, ``normalize_rows``, ``backend``)
are given to ``inseq.load_model`` (or the method's constructor).
"""

from __future__ import annotations

from inseq.attr.feat.feature_attribution import FeatureAttribution
from inseq.attr.step_functions import get_step_function
from inseq.data import FeatureAttributionStepOutput
from inseq.utils import Registry

from transformer_lrp.api import explain
from transformer_lrp.errors import InputError
from transformer_lrp.methods import METHODS

PREFIX = "tlrp_"  # inseq's method names: "tlrp_" + the package's, so that no name of inseq's own is shadowed
_EXPLAIN_OPTIONS = ("start_layer", "normalize_rows", "backend")


class TransformerLRPAttributionRegistry(FeatureAttribution, Registry):
    r"""A method of the package inside inseq's attribution loop (a registry base: each method is a subclass).

    Args:
        attribution_model: inseq's wrapper of a stock ``*ForCausalLM`` the package explains.
        \*\*options: ``explain``'s ``start_layer``, ``normalize_rows``, ``backend``.
    """

    explained_method = "transformer_attribution"

    def __init__(self, attribution_model, **options):
        unknown = sorted(set(options) - set(_EXPLAIN_OPTIONS))
        if unknown:
            raise InputError(f"unknown options {unknown}; {self.method_name} takes {list(_EXPLAIN_OPTIONS)}")
        super().__init__(attribution_model)
        if attribution_model.is_encoder_decoder:
            raise InputError(f"{self.method_name} explains decoder-only language models (*ForCausalLM)")
        self.options = options
        self.attribute_batch_ids = True  # the step gets token ids: explain embeds them itself
        self.forward_batch_embeds = False
        _explain_logits_by_default(attribution_model)

    def attribute_step(self, attribute_fn_main_args: dict, attribution_args: dict | None = None
                       ) -> FeatureAttributionStepOutput:
        """The relevance of every prefix token for the step's target token: `[batch, prefix length]`."""
        input_ids, target_ids, attributed_fn, attention_mask = attribute_fn_main_args["additional_forward_args"][:4]
        if attributed_fn is not get_step_function("logit"):
            raise InputError(f"{self.method_name} explains the target token's logit: use attributed_fn='logit' "
                             f"(got {getattr(attributed_fn, '__name__', attributed_fn)})")
        exp = explain(self.attribution_model.model, {"input_ids": input_ids, "attention_mask": attention_mask},
                      target_ids.reshape(-1), method=self.explained_method, **self.options)
        return FeatureAttributionStepOutput(source_attributions=None, target_attributions=exp.relevance.detach(),
                                            step_scores={})


def _explain_logits_by_default(attribution_model) -> None:
    """Make ``"logit"`` the model's default ``attributed_fn``. inseq 0.7.1 attaches the setter of
    ``default_attributed_fn_id`` to a property named ``set_attributed_fn`` (the former has no setter); both names
    are tried, so a corrected inseq works too."""
    for name in ("default_attributed_fn_id", "set_attributed_fn"):
        try:
            setattr(attribution_model, name, "logit")
            return
        except AttributeError:
            continue
    raise InputError("cannot set inseq's default attributed_fn: pass attributed_fn='logit' to attribute()")


def _register(method: str) -> type[TransformerLRPAttributionRegistry]:
    name = "".join(part.title() for part in method.split("_")) + "InseqAttribution"
    return type(name, (TransformerLRPAttributionRegistry,), {
        "method_name": PREFIX + method, "explained_method": method, "__module__": __name__,
        "__doc__": f"``transformer_lrp.explain(method={method!r})`` as inseq's ``{PREFIX + method}``."})


REGISTERED = {PREFIX + method: _register(method) for method in METHODS}
