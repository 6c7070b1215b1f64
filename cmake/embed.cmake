# Turns a Lua source file into a C array, so the module carries its Lua layer.
# usage: cmake -DNAME=symbol -DIN=file.lua -DOUT=file.h -P embed.cmake
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" len)
math(EXPR size "${len} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," body "${hex}")
string(REGEX REPLACE "((0x..,){16})" "\\1\n" body "${body}")
file(WRITE "${OUT}" "/* generated from ${IN} by cmake/embed.cmake: do not edit */\n"
  "static const char ${NAME}[${size}] = {\n${body}};\n")
