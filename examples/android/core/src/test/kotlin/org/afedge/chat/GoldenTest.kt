package org.afedge.chat

import java.io.File

/**
 * Checks the Kotlin core against golden files written by the Python side (`python -m afedge.chat.golden DIR`):
 * the same token ids, the same manifest fields and fingerprint, the same greedy continuation from recorded logits,
 * and state files readable both ways. Usage: GoldenTestKt GOLDEN_DIR OUT_DIR; exit status 1 on any failure.
 */
private var checks = 0
private val failures = ArrayList<String>()

private fun check(ok: Boolean, what: () -> String) {
    checks++
    if (!ok) failures.add(what())
}

private fun expectRefused(what: String, mustMention: String, block: () -> Unit) {
    try {
        block()
        check(false) { "$what: was accepted" }
    } catch (e: StateFile.Refused) {
        check(e.message!!.contains(mustMention)) { "$what: refused for the wrong reason: ${e.message}" }
    }
}

@Suppress("UNCHECKED_CAST")
private fun json(f: File): Map<String, Any?> = Json.parse(f.readText()) as Map<String, Any?>

private fun ints(x: Any?): List<Int> = (x as List<*>).map { (it as Number).toInt() }

/** Replays recorded runtime calls: checks each call's method and tokens, returns its recorded logits. */
private class ReplayRunner(calls: List<Map<String, Any?>>, val slots: List<Slot>) : StepRunner {
    private val calls = calls.iterator()
    private var n = 0
    private var last: List<FloatArray>? = null
    var mismatches = ArrayList<String>()

    private fun next(method: String, tokens: List<Long>, state: List<FloatArray>): StepOutput {
        if (last != null && state !== last) mismatches.add("call $n: the state passed in is not the one returned")
        if (!calls.hasNext()) throw IllegalStateException("more runtime calls than recorded (call $n: $method)")
        val c = calls.next()
        if (c["method"] != method || ints(c["tokens"]).map { it.toLong() } != tokens)
            mismatches.add("call $n: fed $method $tokens, Python fed ${c["method"]} ${c["tokens"]}")
        val logits = (c["logits"] as List<*>).map { (it as Number).toFloat() }.toFloatArray()
        n++
        last = slots.map { s -> FloatArray(s.numel) { n.toFloat() } }
        return StepOutput(logits, last!!)
    }

    override fun step(token: Long, state: List<FloatArray>) = next("step", listOf(token), state)
    override fun prefill(tokens: LongArray, state: List<FloatArray>) = next("prefill", tokens.toList(), state)
    val exhausted: Boolean get() = !calls.hasNext()
}

fun main(args: Array<String>) {
    val dir = File(args[0])
    val out = File(args[1]).also { it.mkdirs() }

    // 1. tokenizers: the bundle's (bytes) and a trained byte-level BPE with merges
    for ((tokFile, casesFile) in listOf("tokenizer.json" to "tokens.json", "bpe_tokenizer.json" to "bpe_tokens.json")) {
        val tok = Tokenizer.fromJson(File(dir, tokFile).readText(), tokFile)
        for (case in json(File(dir, casesFile))["cases"] as List<*>) {
            val c = case as Map<*, *>
            val text = c["text"] as String
            val ids = tok.encode(text).toList()
            check(ids == ints(c["ids"])) { "$tokFile: encode('$text') = $ids, Python ${c["ids"]}" }
            check(tok.decode(ints(c["ids"]).toIntArray()) == c["decoded"]) { "$tokFile: decode of '$text' differs" }
        }
    }

    // 2. the manifest
    val manifest = Manifest.fromJson(File(dir, "manifest.json").readText())
    val want = json(File(dir, "expect_manifest.json"))
    check(manifest.fingerprint == want["fingerprint"]) { "fingerprint ${manifest.fingerprint} != ${want["fingerprint"]}" }
    check(manifest.vocabSize.toLong() == want["vocab_size"]) { "vocab_size ${manifest.vocabSize}" }
    check(manifest.prefillLen.toLong() == want["prefill_len"]) { "prefill_len ${manifest.prefillLen}" }
    check(manifest.stateBytes == want["state_bytes"]) { "state_bytes ${manifest.stateBytes}" }
    check(manifest.pteFile() == want["pte_file"]) { "pte file ${manifest.pteFile()}" }
    check(manifest.tokenizerFile == want["tokenizer"]) { "tokenizer ${manifest.tokenizerFile}" }
    check(manifest.inputNames == want["input_names"]) { "input_names ${manifest.inputNames}" }
    val wantSlots = (want["slots"] as List<*>).map { s -> (s as Map<*, *>)["name"].toString() to ints(s["shape"]) }
    check(manifest.slots.map { it.name to it.shape.map { d -> d.toInt() } } == wantSlots) { "slots differ: $wantSlots" }

    // 3. the generation loop: the same tokens fed, the same greedy replies, from the recorded logits
    val replay = json(File(dir, "replay.json"))
    @Suppress("UNCHECKED_CAST")
    val runner = ReplayRunner(replay["calls"] as List<Map<String, Any?>>, manifest.slots)
    val tok = Tokenizer.fromJson(File(dir, manifest.tokenizerFile).readText())
    val conv = Conversation(runner, tok, manifest, (replay["max_new"] as Number).toInt())
    for (t in replay["turns"] as List<*>) {
        val turn = t as Map<*, *>
        val streamed = StringBuilder()
        val reply = conv.say(turn["user"] as String) { streamed.append(it) }
        check(reply == turn["reply"]) { "reply to '${turn["user"]}': '$reply', Python '${turn["reply"]}'" }
        check(streamed.toString() == reply) { "streamed pieces '$streamed' do not add up to '$reply'" }
    }
    check(runner.mismatches.isEmpty()) { runner.mismatches.joinToString("; ") }
    check(runner.exhausted) { "fewer runtime calls than Python made" }
    check(conv.tokensSeen == replay["tokens_seen"]) { "tokens seen ${conv.tokensSeen} != ${replay["tokens_seen"]}" }

    // 4. state files both ways, and refusals
    val expect = json(File(dir, "expect_state.json"))
    val snap = StateFile.load(File(dir, "state.safetensors"), manifest)
    check(StateFile.digest(snap.state) == expect["sha256"]) { "state sha256 differs" }
    check(snap.tokensSeen == expect["tokens_seen"]) { "tokens_seen ${snap.tokensSeen}" }
    check(snap.pending.toList() == ints(expect["pending"])) { "pending ${snap.pending.toList()}" }
    conv.restore(snap)
    StateFile.save(File(out, "kotlin_state.safetensors"), conv.snapshot(), manifest)
    val again = StateFile.load(File(out, "kotlin_state.safetensors"), manifest)
    check(StateFile.digest(again.state) == expect["sha256"]) { "Kotlin round trip changed the state" }
    expectRefused("another model's state", "another model") {
        StateFile.load(File(dir, "state_other_model.safetensors"), manifest) }
    val bytes = File(dir, "state.safetensors").readBytes()
    val flipped = bytes.copyOf().also { it[it.size - 3] = (it[it.size - 3].toInt() xor 0x40).toByte() }
    File(out, "flipped.safetensors").writeBytes(flipped)
    expectRefused("a bit-flipped state", "corrupted") { StateFile.load(File(out, "flipped.safetensors"), manifest) }
    File(out, "truncated.safetensors").writeBytes(bytes.copyOf(bytes.size - 16))
    expectRefused("a truncated state", "truncated") { StateFile.load(File(out, "truncated.safetensors"), manifest) }
    File(out, "junk.safetensors").writeBytes("not a state file".toByteArray())
    expectRefused("junk", "not a safetensors") { StateFile.load(File(out, "junk.safetensors"), manifest) }

    if (failures.isNotEmpty()) {
        failures.forEach { System.err.println("FAIL: $it") }
        System.err.println("${failures.size} of $checks checks failed")
        System.exit(1)
    }
    println("ok: $checks checks")
}
