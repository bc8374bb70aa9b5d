package org.afedge.chat

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest

/**
 * Conversation state files, the same format as `afedge chat`'s /save (afedge/chat/statefile.py): safetensors with
 * one F32 tensor per state slot and `__metadata__` {format, version, model_fingerprint, tokens_seen, pending,
 * sha256 of the state bytes in slot order}. A file from another model or a corrupted one is refused.
 */
object StateFile {
    const val FORMAT = "afedge-chat-state"
    const val VERSION = "1"

    class Refused(message: String) : Exception(message)

    fun digest(state: List<FloatArray>): String {
        val md = MessageDigest.getInstance("SHA-256")
        for (t in state) md.update(leBytes(t))
        return Manifest.hex(md.digest())
    }

    /** Written to a temporary file beside `file`, then renamed over it. */
    fun save(file: File, snap: Snapshot, manifest: Manifest) {
        val header = LinkedHashMap<String, Any?>()
        header["__metadata__"] = linkedMapOf("format" to FORMAT, "version" to VERSION,
            "model_fingerprint" to manifest.fingerprint, "tokens_seen" to snap.tokensSeen.toString(),
            "pending" to snap.pending.joinToString(","), "sha256" to digest(snap.state))
        var offset = 0L
        manifest.slots.forEachIndexed { i, slot ->
            if (snap.state[i].size != slot.numel) throw IllegalArgumentException("state slot ${slot.name}: wrong size")
            header[slot.name] = linkedMapOf("dtype" to "F32", "shape" to slot.shape.toList(),
                "data_offsets" to listOf(offset, offset + slot.nbytes))
            offset += slot.nbytes
        }
        var json = Json.write(header)
        while ((8 + json.toByteArray().size) % 8 != 0) json += " "  // keep the data 8-byte aligned
        val head = json.toByteArray()
        val tmp = File(file.parentFile, ".${file.name}.tmp")
        tmp.outputStream().use { out ->
            out.write(ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(head.size.toLong()).array())
            out.write(head)
            for (t in snap.state) out.write(leBytes(t))
        }
        if (!tmp.renameTo(file)) throw java.io.IOException("cannot rename $tmp to $file")
    }

    fun load(file: File, manifest: Manifest): Snapshot {
        val bytes = try { file.readBytes() } catch (e: java.io.IOException) { throw Refused("$file: ${e.message}") }
        if (bytes.size < 8) throw Refused("$file: not a safetensors state file (too short)")
        val n = ByteBuffer.wrap(bytes, 0, 8).order(ByteOrder.LITTLE_ENDIAN).long
        if (n < 2 || 8 + n > bytes.size) throw Refused("$file: not a safetensors state file (bad header length)")
        val header = try { Json.parse(String(bytes, 8, n.toInt(), Charsets.UTF_8)).obj("header") }
            catch (e: IllegalArgumentException) { throw Refused("$file: not a safetensors state file (${e.message})") }
        val meta = header["__metadata__"] as? Map<*, *> ?: emptyMap<String, Any?>()
        if (meta["format"] != FORMAT || meta["version"] != VERSION)
            throw Refused("$file: not an $FORMAT v$VERSION file")
        if (meta["model_fingerprint"] != manifest.fingerprint)
            throw Refused("$file: saved from another model (fingerprint ${meta["model_fingerprint"]}, " +
                "this model ${manifest.fingerprint})")
        val base = 8 + n.toInt()
        val state = manifest.slots.map { slot ->
            val t = header[slot.name] as? Map<*, *> ?: throw Refused("$file: state slot ${slot.name} is missing")
            val shape = (t["shape"] as? List<*>)?.map { (it as Number).toLong() }
            if (t["dtype"] != "F32" || shape != slot.shape.toList())
                throw Refused("$file: slot ${slot.name} must be F32${slot.shape.toList()}, got ${t["dtype"]}$shape")
            val off = (t["data_offsets"] as? List<*>)?.map { (it as Number).toLong() }
                ?: throw Refused("$file: slot ${slot.name} has no data_offsets")
            if (off[1] - off[0] != slot.nbytes || base + off[1] > bytes.size)
                throw Refused("$file: slot ${slot.name} data is truncated")
            val buf = ByteBuffer.wrap(bytes, base + off[0].toInt(), slot.nbytes.toInt()).order(ByteOrder.LITTLE_ENDIAN)
            FloatArray(slot.numel) { buf.float }
        }
        if (digest(state) != meta["sha256"])
            throw Refused("$file: corrupted (the state bytes do not match the sha256 in its header)")
        val pending = (meta["pending"] as? String ?: "").split(",").filter { it.isNotEmpty() }.map { it.toInt() }
        val seen = (meta["tokens_seen"] as? String)?.toLongOrNull() ?: throw Refused("$file: bad tokens_seen")
        return Snapshot(state, pending.toIntArray(), seen)
    }

    private fun leBytes(t: FloatArray): ByteArray {
        val b = ByteBuffer.allocate(t.size * 4).order(ByteOrder.LITTLE_ENDIAN)
        for (x in t) b.putFloat(x)
        return b.array()
    }
}
