"""Rubric and LLM-judge flags, which of them want a judge (`judge_wanted`), and the judge's checks
(`validate_judge`, run without calling the judge, --dry_run included)."""

import os
from typing import Optional

from .base import documented, require, require_url


@documented("rubrics")
class RubricConfig:
    use_general_rubric: bool = False
    """Judge rubric rows (dataset general_rubric / rubric) on one fixed general rubric (comprehensive, factual, coherent; 0-2 each) instead of their own items."""
    apply_adaptive_rubric_reward: bool = False
    """Each step, let the judge read each rubric prompt's rollouts and propose 1-5 new positive / negative items, used to score those rollouts."""
    normalize_rubric_scores: bool = False
    """Turn each rubric item's scores into z-scores across the prompt's group before weighting (items everyone meets or misses count 0)."""
    use_rubric_buffer: bool = False
    """Keep per-prompt active / inactive / persistent / static rubric lists across steps; retire items that no longer tell responses apart."""
    max_active_rubrics: int = 5
    """Most active (non-persistent) rubric items per prompt in the buffer; the highest-variance ones stay."""
    use_static_rubrics_as_persistent_rubrics: bool = True
    """The row's own rubric items are persistent (never retired); false: they start active and can be retired, and come back every add_static_rubrics_to_active_rubrics_every_n_steps steps."""
    add_static_rubrics_to_active_rubrics_every_n_steps: int = 10
    """With use_static_rubrics_as_persistent_rubrics false: re-add the row's missing items to the active set every N steps."""
    use_likert_rubric: bool = False
    """Judge each rubric row's response with one holistic 1-10 score (/ 10) instead of per-item scores."""
    save_adaptive_rubrics: bool = False
    """Write one JSON line per prompt and step to <run>/adaptive_rubrics_<run_name>.jsonl (items added, retired, active, per-item score mean/std, skipped)."""
    answer_length_limit_in_words: int = 450
    """Responses shown to the judge when it writes adaptive rubrics are cut to this many words."""
    llm_judge_model: Optional[str] = None
    """Judge model name served by llm_judge_base_url (needed by every rubric flag and by rubric rows)."""
    llm_judge_base_url: Optional[str] = None
    """OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8001/v1. Default: $OPENAI_BASE_URL, else OpenAI's."""
    llm_judge_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the judge's API key (the key itself is never a flag: flags land in logs). Not needed for a local URL. New."""
    llm_judge_rubric_model: Optional[str] = None
    """Model that writes adaptive rubrics (same server); default llm_judge_model. New."""
    llm_judge_max_tokens: int = 2048
    """Most tokens in a judge reply."""
    llm_judge_temperature: float = 1.0
    """Judge sampling temperature."""
    llm_judge_timeout: int = 60
    """Seconds before a judge request times out (then it is retried)."""
    llm_judge_max_context_length: int = 2048
    """The judge's input budget in tokens (estimated): the judged response is truncated to fit, never the rubric."""
    llm_judge_max_concurrency: int = 16
    """Judge requests in flight at once (all of a step's calls run concurrently up to this). New."""
    llm_judge_max_retries: int = 3
    """Retries of a judge request on connection errors, timeouts, 429 and 5xx, with exponential backoff. New."""
    llm_judge_structured_output: bool = True
    """Ask the judge for a JSON schema (response_format); a server that refuses it gets plain requests, parsed tolerantly. New."""
    llm_judge_max_failed_steps: int = 3
    """Stop the run (after saving) when every judge call failed for this many steps in a row. New."""


RUBRIC_SWITCHES = ("use_general_rubric", "apply_adaptive_rubric_reward", "normalize_rubric_scores", "use_rubric_buffer", "use_likert_rubric",
                   "save_adaptive_rubrics")


def judge_wanted(rc: RubricConfig) -> bool:
    return bool(rc.llm_judge_model) or any(getattr(rc, name) for name in RUBRIC_SWITCHES)


def validate_judge(rc: RubricConfig) -> None:
    """The judge's configuration, checked without calling it (--dry_run included)."""
    if not judge_wanted(rc):
        return
    switch = next((f"--{name}" for name in RUBRIC_SWITCHES if getattr(rc, name)), "rubric scoring")
    require(bool(rc.llm_judge_model), f"{switch} needs a judge: set --llm_judge_model (and --llm_judge_base_url for a server other than OpenAI's)")
    from ..judge import is_local, resolve_base_url

    url = resolve_base_url(rc.llm_judge_base_url)
    require_url("llm_judge_base_url", url)
    require(is_local(url) or bool(os.environ.get(rc.llm_judge_api_key_env)),
            f"the judge at {url} needs an API key in ${rc.llm_judge_api_key_env}; export it (a key is never a flag) or name another variable with --llm_judge_api_key_env")
    for name in ("llm_judge_max_tokens", "llm_judge_timeout", "llm_judge_max_context_length", "llm_judge_max_concurrency",
                 "max_active_rubrics", "add_static_rubrics_to_active_rubrics_every_n_steps", "answer_length_limit_in_words", "llm_judge_max_failed_steps"):
        require(getattr(rc, name) > 0, f"--{name} must be > 0, got {getattr(rc, name)}")
    require(rc.llm_judge_max_retries >= 0, f"--llm_judge_max_retries must be >= 0, got {rc.llm_judge_max_retries}")
    require(rc.llm_judge_temperature >= 0, f"--llm_judge_temperature must be >= 0, got {rc.llm_judge_temperature}")
    require(rc.llm_judge_max_context_length > 200, f"--llm_judge_max_context_length {rc.llm_judge_max_context_length} leaves no room for the rubric and the response; give the judge's context size")
