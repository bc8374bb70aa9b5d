package org.afedge.chat

import java.security.MessageDigest

/** One recurrent state tensor of the bundle's state contract (manifest.json "state"). */
class Slot(val name: String, val shape: LongArray, val dtype: String, val init: Float) {
    val numel: Int get() = shape.fold(1L) { a, b -> a * b }.toInt()
    val nbytes: Long get() = numel * 4L
}

/** An exported file of the bundle (manifest.json "artifacts"). */
class ArtifactRef(val name: String, val runtime: String, val arch: String, val files: Map<String, String>)

/**
 * What the app needs from a bundle's manifest.json: the program's static shapes, the state contract (slot order is
 * the order of the graphs' state inputs and outputs), the artifacts and the tokenizer file.
 */
class Manifest(
    val vocabSize: Int,
    val prefillLen: Int,
    val batch: Int,
    val slots: List<Slot>,
    val stateBytes: Long,
    val artifacts: List<ArtifactRef>,
    val tokenizerFile: String,
    val weightsSha256: String,
    val inputNames: Map<String, List<String>>,
    val executorchVersion: String?
) {
    /** sha256 over the reference weights' sha256 and one `name:dtype:d0xd1...` line per slot (afedge.chat.statefile). */
    val fingerprint: String
        get() {
            val lines = listOf(weightsSha256) + slots.map { s -> "${s.name}:${s.dtype}:${s.shape.joinToString("x")}" }
            return hex(MessageDigest.getInstance("SHA-256").digest(lines.joinToString("\n").toByteArray()))
        }

    fun initState(): List<FloatArray> = slots.map { s -> FloatArray(s.numel) { s.init } }

    /** The .pte holding both methods (the ExecuTorch artifact's "step" file). */
    fun pteFile(): String = artifacts.firstOrNull { it.runtime == "executorch" }?.files?.get("step")
        ?: throw IllegalArgumentException("manifest.json: the bundle has no executorch artifact " +
            "(export with --runtimes executorch)")

    companion object {
        fun fromJson(text: String, where: String = "manifest.json"): Manifest {
            val root = Json.parse(text).obj(where)
            val program = root.child("program", where)
            val p = "$where.program"
            val slots = root.list("state", where).mapIndexed { i, x ->
                val s = x.obj("$where.state[$i]")
                val w = "$where.state[$i]"
                val dtype = s.str("dtype", w)
                if (dtype != "float32") throw IllegalArgumentException("$w: dtype $dtype is not supported (float32 only)")
                Slot(s.str("name", w), s.list("shape", w).map { (it as Number).toLong() }.toLongArray(), dtype,
                    (s.get("init", w) as Number).toFloat())
            }
            val stateBytes = root.long("state_bytes", where)
            if (stateBytes != slots.map { it.nbytes }.sum())
                throw IllegalArgumentException("$where: state_bytes $stateBytes does not match the slots " +
                    "(${slots.map { it.nbytes }.sum()})")
            val artifacts = root.list("artifacts", where).mapIndexed { i, x ->
                val a = x.obj("$where.artifacts[$i]")
                val w = "$where.artifacts[$i]"
                ArtifactRef(a.str("name", w), a.str("runtime", w), a.str("arch", w),
                    a.child("files", w).mapValues { it.value.toString() })
            }
            val reference = root.child("model", where).str("reference", "$where.model")
            val weights = root.child("files", where).child("$reference/model.safetensors", "$where.files")
                .str("sha256", "$where.files.$reference/model.safetensors")
            val names = program.child("input_names", p).mapValues { e -> (e.value as List<*>).map { it.toString() } }
            val versions = root["versions"] as? Map<*, *>
            return Manifest(program.long("vocab_size", p).toInt(), program.long("prefill_len", p).toInt(),
                program.long("batch", p).toInt(), slots, stateBytes, artifacts, root.str("tokenizer", where),
                weights, names, versions?.get("executorch") as? String)
        }

        fun hex(bytes: ByteArray): String = bytes.joinToString("") { String.format("%02x", it.toInt() and 0xff) }
    }
}
