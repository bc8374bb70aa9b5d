package org.afedge.chat.app

import org.afedge.chat.Manifest
import org.afedge.chat.StepOutput
import org.afedge.chat.StepRunner
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/**
 * The bundle's multi-method .pte through ExecuTorch's Android API: methods "step" (token (B,) int64) and "prefill"
 * (tokens (B, prefill_len) int64), each taking and returning the state tensors in the manifest's "state" order:
 * (token(s), *state) -> (logits (B, V), *state).
 */
class ExecuTorchRunner(ptePath: String, private val manifest: Manifest) : StepRunner, AutoCloseable {
    private val module: Module = Module.load(ptePath)
    private val batch = manifest.batch.toLong()

    init {
        module.loadMethod("step")
        module.loadMethod("prefill")
    }

    override fun step(token: Long, state: List<FloatArray>): StepOutput =
        run("step", Tensor.fromBlob(longArrayOf(token), longArrayOf(batch)), state)

    override fun prefill(tokens: LongArray, state: List<FloatArray>): StepOutput {
        require(tokens.size == manifest.prefillLen) { "prefill takes exactly ${manifest.prefillLen} tokens" }
        return run("prefill", Tensor.fromBlob(tokens, longArrayOf(batch, tokens.size.toLong())), state)
    }

    private fun run(method: String, tokens: Tensor, state: List<FloatArray>): StepOutput {
        val inputs = ArrayList<EValue>(1 + state.size)
        inputs.add(EValue.from(tokens))
        manifest.slots.forEachIndexed { i, slot -> inputs.add(EValue.from(Tensor.fromBlob(state[i], slot.shape))) }
        val out = module.execute(method, *inputs.toTypedArray())
        check(out.size == 1 + manifest.slots.size) {
            "$method returned ${out.size} values; the state contract needs 1 + ${manifest.slots.size}"
        }
        return StepOutput(out[0].toTensor().dataAsFloatArray, out.drop(1).map { it.toTensor().dataAsFloatArray })
    }

    override fun close() = module.destroy()
}
