package org.afedge.chat

/** What a runtime returns: last-position logits (vocab_size floats) and the next state, in contract order. */
class StepOutput(val logits: FloatArray, val state: List<FloatArray>)

/**
 * The two methods of an exported program, as the .pte holds them: inputs (token(s), *state) -> (logits, *state),
 * state in the manifest's "state" order. Implementations must not keep or mutate the arrays they are given.
 */
interface StepRunner {
    /** One token. */
    fun step(token: Long, state: List<FloatArray>): StepOutput

    /** Exactly `prefillLen` tokens through the chunked prefill graph. */
    fun prefill(tokens: LongArray, state: List<FloatArray>): StepOutput
}
