"""The prompt and scoring functions of lm-eval's own wikitext and winogrande tasks, re-exported for the offline
task YAMLs here (`!function` resolves names relative to the YAML's folder)."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_results
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

__all__ = ["wikitext_detokenizer", "wikitext_results", "doc_to_text", "doc_to_target", "doc_to_choice"]
